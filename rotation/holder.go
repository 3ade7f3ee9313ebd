package rotation

import (
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"
)

// holderPrefix starts every lease holder identity kmsctl writes.
const holderPrefix = "kmsctl@"

// Holder identifies the process holding the rotation lease precisely enough
// that a later run on the same machine can prove it dead and take the lease
// over at once, instead of waiting for a SIGKILLed run's lease to expire.
// A PID alone proves nothing: PIDs are reused. Start (the process start time
// in clock ticks since boot) pins one process behind the PID, BootID pins
// the kernel run those two numbers belong to, and PIDNS pins the PID table
// (container) the PID is a number in: two containers with the same host
// name, such as host-network pods, each have their own PID 1.
type Holder struct {
	Host   string
	BootID string
	PID    int
	// Start is field 22 of /proc/<pid>/stat.
	Start uint64
	// PIDNS is the inode number of the holder's PID namespace
	// (/proc/self/ns/pid); 0 when unknown.
	PIDNS uint64
}

// String is the identity stored in the Lease's spec.holderIdentity.
// ParseHolder reads it back.
func (h Holder) String() string {
	return fmt.Sprintf("%s%s/pid=%d,start=%d,boot=%s,pidns=%d", holderPrefix, h.Host, h.PID, h.Start, h.BootID, h.PIDNS)
}

// ParseHolder parses an identity written by Holder.String. Anything else,
// such as the "kmsctl@host/pid" of older kmsctl versions, another tool's
// identity or a non-canonical spelling, is not a Holder: nothing can be
// proven about it, so its lease is only ever taken after it expires.
func ParseHolder(s string) (Holder, bool) {
	rest, ok := strings.CutPrefix(s, holderPrefix)
	i := strings.LastIndex(rest, "/")
	if !ok || i <= 0 {
		return Holder{}, false
	}
	vals, ok := holderFields(rest[i+1:], "pid", "start", "boot", "pidns")
	if !ok {
		return Holder{}, false
	}
	pid, err1 := strconv.Atoi(vals[0])
	start, err2 := strconv.ParseUint(vals[1], 10, 64)
	pidns, err3 := strconv.ParseUint(vals[3], 10, 64)
	if err := errors.Join(err1, err2, err3); err != nil || pid <= 0 {
		return Holder{}, false
	}
	h := Holder{Host: rest[:i], BootID: vals[2], PID: pid, Start: start, PIDNS: pidns}
	// Only the canonical spelling round-trips (no "pid=007", no "+1").
	if h.String() != s {
		return Holder{}, false
	}
	return h, true
}

// holderFields splits "k1=v1,k2=v2,..." whose keys are exactly keys, in
// that order, and returns the values.
func holderFields(s string, keys ...string) ([]string, bool) {
	parts := strings.Split(s, ",")
	if len(parts) != len(keys) {
		return nil, false
	}
	vals := make([]string, len(keys))
	for i, p := range parts {
		v, ok := strings.CutPrefix(p, keys[i]+"=")
		if !ok {
			return nil, false
		}
		vals[i] = v
	}
	return vals, true
}

// procFS reads process facts from a proc file system. It is a value, not
// direct calls to /proc, so tests can point it at a directory of fake stat
// files and fake the existence check.
type procFS struct {
	// root is where proc is mounted ("/proc").
	root string
	// signal0 sends signal 0 to pid: nil or EPERM when the process exists,
	// ESRCH when it does not. Unlike /proc it is not hidden by the hidepid
	// mount option, under which another user's live process has no entry.
	signal0 func(pid int) error
	// supported is false where proc does not describe processes the Linux
	// way; no holder is provably dead there.
	supported bool
}

// sysProc is the proc file system of this machine.
var sysProc = procFS{root: "/proc", signal0: signalZero, supported: runtime.GOOS == "linux"}

// CurrentHolder returns the identity of this process. When proc cannot be
// read, it returns the host and PID together with an error: that Holder is
// still a usable lease identity, but a crash of this run can then not be
// proven later, so a rerun waits for the lease to expire. Callers may warn
// and go on. Outside Linux it returns host and PID only, and no error.
// It fails outright only when the host name is unknown.
func CurrentHolder() (Holder, error) {
	host, err := os.Hostname()
	if err != nil {
		return Holder{}, fmt.Errorf("holder identity: %w", err)
	}
	h := Holder{Host: host, PID: os.Getpid()}
	if !sysProc.supported {
		return h, nil
	}
	full, err := sysProc.complete(h)
	if err != nil {
		return h, fmt.Errorf("holder identity: %w", err)
	}
	return full, nil
}

// complete adds boot ID, start time and PID namespace to h, all or none:
// a Holder with some of them missing could otherwise look like another
// process (a Start of 0 differs from every live process's).
func (p procFS) complete(h Holder) (Holder, error) {
	boot, err := os.ReadFile(filepath.Join(p.root, "sys", "kernel", "random", "boot_id"))
	if err != nil {
		return h, fmt.Errorf("boot id: %w", err)
	}
	_, start, err := p.stat(h.PID)
	if err != nil {
		return h, err
	}
	ns, err := p.pidNamespace()
	if err != nil {
		return h, err
	}
	h.BootID, h.Start, h.PIDNS = strings.TrimSpace(string(boot)), start, ns
	if h.BootID == "" || h.Start == 0 || h.PIDNS == 0 {
		return Holder{Host: h.Host, PID: h.PID}, errors.New("proc: empty boot id, start time or pid namespace")
	}
	return h, nil
}

// stat returns the state (field 3) and start time (field 22) of pid.
func (p procFS) stat(pid int) (byte, uint64, error) {
	b, err := os.ReadFile(filepath.Join(p.root, strconv.Itoa(pid), "stat"))
	if err != nil {
		return 0, 0, fmt.Errorf("process %d: %w", pid, err)
	}
	state, start, err := parseStat(b)
	if err != nil {
		return 0, 0, fmt.Errorf("process %d: %w", pid, err)
	}
	return state, start, nil
}

// parseStat reads state and start time from the text of /proc/<pid>/stat.
// Field 2, the command name in parentheses, may itself contain spaces and
// ')', so the fields are counted from after the last ')'.
func parseStat(b []byte) (byte, uint64, error) {
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return 0, 0, errors.New("stat: no command name")
	}
	f := strings.Fields(string(b[i+1:]))
	// f[0] is field 3 (state), so field 22 (starttime) is f[19].
	if len(f) < 20 || len(f[0]) != 1 {
		return 0, 0, fmt.Errorf("stat: %d fields after the command name, want at least 20", len(f))
	}
	start, err := strconv.ParseUint(f[19], 10, 64)
	if err != nil {
		return 0, 0, fmt.Errorf("stat: start time: %w", err)
	}
	return f[0][0], start, nil
}

// pidNamespace returns the inode number of this process's PID namespace,
// which /proc/self/ns/pid links to as "pid:[4026531836]".
func (p procFS) pidNamespace() (uint64, error) {
	link, err := os.Readlink(filepath.Join(p.root, "self", "ns", "pid"))
	if err != nil {
		return 0, fmt.Errorf("pid namespace: %w", err)
	}
	inner, ok := strings.CutPrefix(link, "pid:[")
	inner, ok2 := strings.CutSuffix(inner, "]")
	n, err := strconv.ParseUint(inner, 10, 64)
	if !ok || !ok2 || err != nil {
		return 0, fmt.Errorf("pid namespace: unexpected link %q", link)
	}
	return n, nil
}

// ProvablyDead reports whether the process h is certainly gone, judged by
// self, this process: only on the same host, boot and PID namespace can
// h's PID be looked up, and it is dead when no process has that PID, or
// the one that has it started at another time (the PID was reused), or it
// has exited and is waiting to be reaped. The reason says why, or why
// nothing can be proven, in words for the operator.
func (h Holder) ProvablyDead(self Holder) (bool, string) {
	return sysProc.provablyDead(h, self)
}

func (p procFS) provablyDead(h, self Holder) (bool, string) {
	if why, ok := sameProcessTable(h, self); !ok {
		return false, why
	}
	if !p.supported {
		return false, "processes cannot be inspected on " + runtime.GOOS
	}
	state, start, err := p.stat(h.PID)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return p.gone(h.PID)
	case err != nil:
		return false, fmt.Sprintf("cannot read %v", err)
	case start != h.Start:
		return true, fmt.Sprintf("pid %d now belongs to another process, started at tick %d, not %d", h.PID, start, h.Start)
	case state == 'Z' || state == 'X':
		return true, fmt.Sprintf("process %d has exited", h.PID)
	}
	return false, fmt.Sprintf("process %d, started at tick %d, is still running on this host", h.PID, start)
}

// sameProcessTable says whether h's PID and start time can be looked up
// by self, and if not, why.
func sameProcessTable(h, self Holder) (string, bool) {
	switch {
	case h.Host == "" || h.BootID == "" || h.PIDNS == 0 || h.Start == 0 || h.PID <= 0:
		return "its identity does not record a boot id, pid namespace and process start time", false
	case self.BootID == "" || self.PIDNS == 0:
		return "this process could not read its own boot id and pid namespace from /proc", false
	case h.Host != self.Host:
		return fmt.Sprintf("it ran on host %q, not on this host (%q)", h.Host, self.Host), false
	case h.BootID != self.BootID:
		return fmt.Sprintf("it ran under boot id %s, host %q is now running boot id %s (rebooted, or another machine of that name)", h.BootID, h.Host, self.BootID), false
	case h.PIDNS != self.PIDNS:
		return fmt.Sprintf("it ran in another pid namespace (another container) on host %q", h.Host), false
	}
	return "", true
}

// gone confirms that pid, which has no proc entry, has no process either:
// hidepid hides another user's live processes from proc, not from kill.
func (p procFS) gone(pid int) (bool, string) {
	err := p.signal0(pid)
	switch {
	case errors.Is(err, syscall.ESRCH):
		return true, fmt.Sprintf("no process %d on this host", pid)
	case err == nil || errors.Is(err, syscall.EPERM):
		return false, fmt.Sprintf("process %d exists but has no readable /proc entry", pid)
	}
	return false, fmt.Sprintf("cannot check process %d: %v", pid, err)
}
