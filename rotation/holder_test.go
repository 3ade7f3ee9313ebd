package rotation

import (
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"
	"testing"
)

// statLine is a /proc/<pid>/stat line with the given command name, state
// and start time (field 22).
func statLine(comm string, state byte, start uint64) string {
	// Fields 4 to 21 (18 of them), then starttime, then a few more.
	return fmt.Sprintf("42 (%s) %c %s %d 100 200 0", comm, state, strings.Repeat("0 ", 18), start)
}

// fakeProc is a proc file system in a temp dir: a stat file per process
// (pid -> start time, state R), processes that exist but have no readable
// entry (hidepid), this process's pid namespace and a boot id.
type fakeProc struct {
	root   string
	hidden map[int]bool
}

func newFakeProc(t *testing.T, procs map[int]uint64) *fakeProc {
	t.Helper()
	f := &fakeProc{root: t.TempDir(), hidden: map[int]bool{}}
	for pid, start := range procs {
		f.put(t, pid, statLine("kmsctl", 'R', start))
	}
	f.write(t, "sys/kernel/random/boot_id", "boot-1\n")
	if err := os.MkdirAll(filepath.Join(f.root, "self", "ns"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("pid:[4026531836]", filepath.Join(f.root, "self", "ns", "pid")); err != nil {
		t.Fatal(err)
	}
	return f
}

func (f *fakeProc) write(t *testing.T, name, content string) {
	t.Helper()
	p := filepath.Join(f.root, name)
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
}

func (f *fakeProc) put(t *testing.T, pid int, stat string) {
	f.write(t, fmt.Sprintf("%d/stat", pid), stat)
}

// fs returns the procFS reading f; signal 0 finds the processes that have
// a stat file or are hidden.
func (f *fakeProc) fs() procFS {
	return procFS{root: f.root, supported: true, signal0: func(pid int) error {
		if f.hidden[pid] {
			return syscall.EPERM
		}
		if _, err := os.Stat(filepath.Join(f.root, fmt.Sprint(pid))); err == nil {
			return nil
		}
		return syscall.ESRCH
	}}
}

// use makes f the machine's proc file system for the rest of the test.
func (f *fakeProc) use(t *testing.T) {
	saved := sysProc
	sysProc = f.fs()
	t.Cleanup(func() { sysProc = saved })
}

func TestHolderRoundTrip(t *testing.T) {
	cases := []struct {
		name string
		h    Holder
		want string
	}{
		{"linux holder", Holder{Host: "node-a", BootID: "e8579509-fee4-42e7-83fb-8590fa73480b", PID: 4711, Start: 57788, PIDNS: 4026531836},
			"kmsctl@node-a/pid=4711,start=57788,boot=e8579509-fee4-42e7-83fb-8590fa73480b,pidns=4026531836"},
		{"host and pid only (not Linux)", Holder{Host: "laptop.local", PID: 9}, "kmsctl@laptop.local/pid=9,start=0,boot=,pidns=0"},
		{"pod name as host", Holder{Host: "kmsctl-rotate-29-x7k2p", BootID: "b", PID: 1, Start: 1, PIDNS: 1},
			"kmsctl@kmsctl-rotate-29-x7k2p/pid=1,start=1,boot=b,pidns=1"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			if got := c.h.String(); got != c.want {
				t.Fatalf("String: got %q, want %q", got, c.want)
			}
			got, ok := ParseHolder(c.want)
			if !ok || got != c.h {
				t.Fatalf("ParseHolder(%q): got %+v, %v; want %+v, true", c.want, got, ok, c.h)
			}
		})
	}
}

func TestParseHolderRejects(t *testing.T) {
	cases := []struct{ name, s string }{
		{"old kmsctl format", "kmsctl@node-a/123"},
		{"empty", ""},
		{"another tool", "kube-controller-manager_1234"},
		{"no host", "kmsctl@/pid=1,start=1,boot=b,pidns=1"},
		{"zero pid", "kmsctl@h/pid=0,start=1,boot=b,pidns=1"},
		{"negative pid", "kmsctl@h/pid=-4,start=1,boot=b,pidns=1"},
		{"non-canonical pid", "kmsctl@h/pid=007,start=1,boot=b,pidns=1"},
		{"fields reordered", "kmsctl@h/start=1,pid=2,boot=b,pidns=1"},
		{"field missing", "kmsctl@h/pid=2,start=1,boot=b"},
		{"extra field", "kmsctl@h/pid=2,start=1,boot=b,pidns=1,x=1"},
		{"start not a number", "kmsctl@h/pid=2,start=soon,boot=b,pidns=1"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			if h, ok := ParseHolder(c.s); ok {
				t.Fatalf("ParseHolder(%q): got %+v, want no holder", c.s, h)
			}
		})
	}
}

func TestParseStat(t *testing.T) {
	cases := []struct {
		name      string
		stat      string
		wantState byte
		wantStart uint64
		wantErr   bool
	}{
		{"plain command", statLine("kmsctl", 'S', 123456), 'S', 123456, false},
		{"command with spaces and parentheses", statLine("a) b ) (c", 'R', 99), 'R', 99, false},
		{"command that looks like fields", statLine("x) R 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20", 'Z', 7), 'Z', 7, false},
		{"no command name", "42 kmsctl S 1 2", 0, 0, true},
		{"truncated", "42 (kmsctl) S 1 2 3", 0, 0, true},
		{"start not a number", strings.Replace(statLine("k", 'S', 5), " 5 100", " x 100", 1), 0, 0, true},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			state, start, err := parseStat([]byte(c.stat))
			if (err != nil) != c.wantErr {
				t.Fatalf("parseStat(%q): err %v, want error %v", c.stat, err, c.wantErr)
			}
			if state != c.wantState || start != c.wantStart {
				t.Fatalf("parseStat(%q): got %c %d, want %c %d", c.stat, state, start, c.wantState, c.wantStart)
			}
		})
	}
}

func TestProvablyDead(t *testing.T) {
	self := Holder{Host: "node-a", BootID: "boot-1", PID: 100, Start: 5000, PIDNS: 4026531836}
	same := func(pid int, start uint64) Holder {
		h := self
		h.PID, h.Start = pid, start
		return h
	}
	cases := []struct {
		name      string
		holder    Holder
		unsupport bool
		wantDead  bool
		wantWhy   string
	}{
		{"same host and boot, pid missing", same(200, 7000), false, true, "no process 200"},
		{"pid present with the same start", same(300, 7000), false, false, "still running"},
		{"pid reused: present with another start", same(300, 6999), false, true, "another process"},
		{"pid of an exited, unreaped process", same(400, 8000), false, true, "has exited"},
		{"pid hidden from proc (hidepid) but alive", same(500, 1), false, false, "no readable /proc entry"},
		{"other host", Holder{Host: "node-b", BootID: "boot-1", PID: 200, Start: 7000, PIDNS: 4026531836}, false, false, "host \"node-b\""},
		{"other boot", Holder{Host: "node-a", BootID: "boot-0", PID: 200, Start: 7000, PIDNS: 4026531836}, false, false, "boot id"},
		{"other pid namespace", Holder{Host: "node-a", BootID: "boot-1", PID: 200, Start: 7000, PIDNS: 1}, false, false, "pid namespace"},
		{"holder without boot id", Holder{Host: "node-a", PID: 200}, false, false, "does not record"},
		{"holder without start time", Holder{Host: "node-a", BootID: "boot-1", PID: 200, PIDNS: 4026531836}, false, false, "does not record"},
		{"no proc on this system", same(200, 7000), true, false, "cannot be inspected"},
	}
	f := newFakeProc(t, map[int]uint64{100: 5000, 300: 7000})
	f.put(t, 400, statLine("kmsctl", 'Z', 8000))
	f.hidden[500] = true
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			p := f.fs()
			p.supported = !c.unsupport
			dead, why := p.provablyDead(c.holder, self)
			if dead != c.wantDead || !strings.Contains(why, c.wantWhy) {
				t.Fatalf("provablyDead(%v): got %v %q, want %v and a reason containing %q", c.holder, dead, why, c.wantDead, c.wantWhy)
			}
		})
	}
}

func TestCompleteReadsFakeProc(t *testing.T) {
	f := newFakeProc(t, map[int]uint64{100: 5000})
	got, err := f.fs().complete(Holder{Host: "node-a", PID: 100})
	want := Holder{Host: "node-a", BootID: "boot-1", PID: 100, Start: 5000, PIDNS: 4026531836}
	if err != nil || got != want {
		t.Fatalf("complete: got %+v, %v; want %+v", got, err, want)
	}
	// A process whose stat cannot be read gets no boot id either, so it
	// can never be mistaken for a dead process later.
	got, err = f.fs().complete(Holder{Host: "node-a", PID: 101})
	if err == nil || got.BootID != "" {
		t.Fatalf("complete without a stat file: got %+v, %v; want no boot id and an error", got, err)
	}
}

// TestCurrentHolderOnThisMachine checks the real /proc: this process is
// alive, and the same pid with another start time is a reused pid.
func TestCurrentHolderOnThisMachine(t *testing.T) {
	if runtime.GOOS != "linux" {
		t.Skip("process identity needs Linux /proc")
	}
	self, err := CurrentHolder()
	if err != nil {
		t.Fatal(err)
	}
	if self.BootID == "" || self.Start == 0 || self.PIDNS == 0 || self.PID != os.Getpid() {
		t.Fatalf("CurrentHolder: got %+v, want boot id, start time, pid namespace and our pid", self)
	}
	if back, ok := ParseHolder(self.String()); !ok || back != self {
		t.Fatalf("ParseHolder(%q): got %+v, %v", self.String(), back, ok)
	}
	if dead, why := self.ProvablyDead(self); dead {
		t.Fatalf("this process: got provably dead (%s)", why)
	}
	reused := self
	reused.Start++
	if dead, why := reused.ProvablyDead(self); !dead {
		t.Fatalf("our pid with another start time: got not provably dead (%s)", why)
	}
}
