// Package tpmtest makes throwaway TPM 2.0 PKCS#11 tokens for tests: a
// software TPM (swtpm) behind the TPM2 access broker (tpm2-abrmd), exposed
// as a PKCS#11 token by tpm2-pkcs11, the module a real node loads to reach
// its /dev/tpmrm0. It is the TPM counterpart of pkcs11test, whose SoftHSM2
// accepts mechanisms and key sizes that a TPM refuses, so code meant for a
// TPM has to be tested against one.
//
// Start runs, per token, three processes in a fresh temporary directory:
// swtpm, a private D-Bus session bus and tpm2-abrmd on that bus (the
// resource manager is not optional: tpm2-pkcs11 straight on the swtpm TCTI
// fails with "out of memory for object contexts"). Each token has its own
// bus, so every broker can keep the default D-Bus name and the TCTI string
// is the same for all of them; only the bus address (DBUS_SESSION_BUS_ADDRESS)
// and the store directory tell tokens apart. The TPM talks over Unix
// sockets inside the directory rather than loopback TCP ports: swtpm cannot
// take an already bound listening socket for its data channel, so a port
// picked in advance could be taken by a parallel test before swtpm binds
// it, while a path in a private directory cannot collide.
//
// tpm2-pkcs11 reads its configuration from the environment when the
// module is initialized, and a process initializes a module once, so one
// process reaches one token: give TPM.Env to child processes, or call
// TPM.SetEnv before the module is first initialized in this one. Start
// itself leaves the environment alone, so tests that use it may run in
// parallel.
package tpmtest

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TPM is a running software TPM with one initialized tpm2-pkcs11 token.
// Its processes stop, and Dir is removed, when the test that started it
// ends.
type TPM struct {
	// Module is the absolute path of libtpm2_pkcs11.so.
	Module string
	// Label is the token label (pkcs11.tokenLabel).
	Label string
	// PinFile holds PIN and a newline, with mode 0600 (pkcs11.pinFile).
	PinFile string
	// PIN is the user PIN.
	PIN string
	// SOPIN is the security officer PIN.
	SOPIN string
	// Dir is the temporary directory holding the TPM state, the sockets,
	// the token store and the processes' logs.
	Dir string
	// Env is every environment entry ("NAME=value") a process that loads
	// Module needs to see this token; append it to os.Environ() for a
	// child process.
	Env []string
}

// SetEnv sets Env in this process for the rest of the test, for providers
// that load the module in-process. tpm2-pkcs11 reads the variables in
// C_Initialize, so call it before the module is first initialized; like
// every t.Setenv it rules out t.Parallel.
func (tp TPM) SetEnv(t testing.TB) {
	t.Helper()
	for _, kv := range tp.Env {
		k, v, _ := strings.Cut(kv, "=")
		t.Setenv(k, v)
	}
}

// ProviderYAML is the body of a plugin config's `provider:` section for
// this token, with key objects labelled keyLabel-<n>. A TPM has no AES-GCM
// and unwraps with RSA, so the section asks for RSA-OAEP-256 with 2048-bit
// keys, a size every TPM 2.0 supports.
func (tp TPM) ProviderYAML(keyLabel string) string {
	return fmt.Sprintf("pkcs11:\n  module: %s\n  tokenLabel: %s\n  pinFile: %s\n  keyLabel: %s\n  algorithm: RSA-OAEP-256\n  keySize: 2048\n",
		tp.Module, tp.Label, tp.PinFile, keyLabel)
}

// installHint is the one command that installs everything Start runs.
const installHint = "apt-get install -y swtpm swtpm-tools tpm2-tools tpm2-abrmd libtss2-tcti-tabrmd0 libtpm2-pkcs11-1 libtpm2-pkcs11-tools dbus sqlite3 (or make deps)"

// moduleCandidates are where distributions install tpm2-pkcs11's module.
var moduleCandidates = []string{
	"/usr/lib/x86_64-linux-gnu/pkcs11/libtpm2_pkcs11.so",
	"/usr/lib/aarch64-linux-gnu/pkcs11/libtpm2_pkcs11.so",
	"/usr/lib/riscv64-linux-gnu/pkcs11/libtpm2_pkcs11.so",
	"/usr/lib/powerpc64le-linux-gnu/pkcs11/libtpm2_pkcs11.so",
	"/usr/lib/s390x-linux-gnu/pkcs11/libtpm2_pkcs11.so",
	"/usr/lib64/pkcs11/libtpm2_pkcs11.so",
	"/usr/lib/pkcs11/libtpm2_pkcs11.so",
	"/usr/local/lib/libtpm2_pkcs11.so",
	"/usr/local/lib/pkcs11/libtpm2_pkcs11.so",
}

// Module returns the path of libtpm2_pkcs11.so: $TPM2_PKCS11_MODULE if
// set, else the first of the usual install locations that exists. It fails
// the test (rather than skipping it) when the module is missing, so a CI
// machine without it cannot pass silently.
func Module(t testing.TB) string {
	t.Helper()
	if m := os.Getenv("TPM2_PKCS11_MODULE"); m != "" {
		return m
	}
	for _, m := range moduleCandidates {
		if _, err := os.Stat(m); err == nil {
			return m
		}
	}
	t.Fatalf("libtpm2_pkcs11.so not found (looked in %v); install it (%s) or set TPM2_PKCS11_MODULE", moduleCandidates, installHint)
	return ""
}

// startTimeout bounds each step of Start. A healthy start takes a few
// seconds, almost all of it tpm2_ptool (Python) creating the primary key
// and the token's seal objects; the bound turns a hang (a broker waiting
// for a TPM that never answers, a bus that never appears) into a failure
// that says which step hung.
const startTimeout = 20 * time.Second

// stopGrace is how long a process has to exit after SIGTERM before it is
// killed.
const stopGrace = 3 * time.Second

// brokerName is tpm2-abrmd's default D-Bus name, which the tabrmd TCTI
// looks for when given no bus_name.
const brokerName = "com.intel.tss2.Tabrmd"

// tcti is how tpm2-pkcs11 and tpm2-tools reach the broker: on the session
// bus named by DBUS_SESSION_BUS_ADDRESS, under brokerName.
const tcti = "tabrmd:bus_type=session"

// Start starts a software TPM, a private D-Bus and a TPM2 access broker in
// a new temporary directory, and creates a token labelled label (a random
// one if empty) with random user and SO PINs, the user PIN also written to
// a 0600 file. Every process it starts is stopped (SIGTERM, then SIGKILL)
// and the directory removed when the test ends. A missing binary fails the
// test with the command that installs it.
func Start(t testing.TB, label string) TPM {
	t.Helper()
	if label == "" {
		label = "kms-" + randomHex(t, 4)
	}
	t0 := time.Now()
	var steps []string
	step := func(name string) {
		steps = append(steps, fmt.Sprintf("%s %v", name, time.Since(t0).Round(time.Millisecond)))
	}
	bins := lookPaths(t, "swtpm", "dbus-daemon", "dbus-send", "tpm2-abrmd", "tpm2_ptool")

	// Not t.TempDir(): its path embeds the test name and can exceed the
	// 108 bytes a Unix socket path may have.
	dir, err := os.MkdirTemp("", "tpm")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	tp := TPM{
		Module:  Module(t),
		Label:   label,
		PinFile: filepath.Join(dir, "pin"),
		PIN:     randomHex(t, 8),
		SOPIN:   randomHex(t, 8),
		Dir:     dir,
	}
	if err := os.WriteFile(tp.PinFile, []byte(tp.PIN+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	state, store := filepath.Join(dir, "state"), filepath.Join(dir, "store")
	for _, d := range []string{state, store} {
		if err := os.Mkdir(d, 0o700); err != nil {
			t.Fatal(err)
		}
	}

	// swtpm: the data socket at dir/tpm and, as the swtpm TCTI expects,
	// the control socket next to it with ".ctrl" appended. The flags let
	// the TPM serve commands without a separate TPM2_Startup.
	sock := filepath.Join(dir, "tpm")
	swtpm := startProc(t, dir, "swtpm", bins["swtpm"], nil, nil,
		"socket", "--tpm2", "--tpmstate", "dir="+state,
		"--server", "type=unixio,path="+sock,
		"--ctrl", "type=unixio,path="+sock+".ctrl",
		"--flags", "not-need-init,startup-clear")
	swtpm.await(t, "its sockets", func() bool { return exists(sock) && exists(sock+".ctrl") })
	step("swtpm")

	// A private session bus, in the foreground so that this process
	// reaps it. It prints its address on fd 3 once it listens.
	addrR, addrW, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer addrR.Close()
	defer addrW.Close() // on failure; closed below once the child has it
	dbus := startProc(t, dir, "dbus-daemon", bins["dbus-daemon"], nil, []*os.File{addrW},
		"--session", "--nofork", "--nopidfile", "--nosyslog",
		"--address=unix:path="+filepath.Join(dir, "bus"), "--print-address=3")
	addrW.Close()
	addr := readLine(t, dbus, addrR)
	step("dbus")

	tp.Env = []string{
		"DBUS_SESSION_BUS_ADDRESS=" + addr,
		"TPM2_PKCS11_TCTI=" + tcti,
		"TPM2TOOLS_TCTI=" + tcti,
		"TPM2_PKCS11_STORE=" + store,
		// The store is a database; without this the module would also try
		// the FAPI backend, which reads the system's FAPI configuration
		// and logs errors when it is absent.
		"TPM2_PKCS11_BACKEND=esysdb",
		// Errors only; the default also prints warnings.
		"TPM2_PKCS11_LOG_LEVEL=0",
	}
	env := append(os.Environ(), tp.Env...)

	// The broker, on that bus. --allow-root: tests often run as root,
	// which tpm2-abrmd refuses by default.
	abrmd := startProc(t, dir, "tpm2-abrmd", bins["tpm2-abrmd"], env, nil,
		"--session", "--allow-root", "--tcti=swtpm:path="+sock)
	abrmd.await(t, "its D-Bus name "+brokerName, func() bool { return nameHasOwner(bins["dbus-send"], env, brokerName) })
	step("tpm2-abrmd")

	run(t, dir, env, bins["tpm2_ptool"], "init", "--path", store)
	step("tpm2_ptool init")
	run(t, dir, env, bins["tpm2_ptool"], "addtoken", "--pid=1", "--label="+label,
		"--sopin="+tp.SOPIN, "--userpin="+tp.PIN, "--path", store)
	step("addtoken")
	t.Logf("tpmtest: token %q in %s up (cumulative: %s)", label, dir, strings.Join(steps, ", "))
	return tp
}

// lookPaths resolves every name on PATH, failing the test with the install
// command if any is missing.
func lookPaths(t testing.TB, names ...string) map[string]string {
	t.Helper()
	paths := make(map[string]string, len(names))
	var missing []string
	for _, n := range names {
		p, err := exec.LookPath(n)
		if err != nil {
			missing = append(missing, n)
			continue
		}
		paths[n] = p
	}
	if len(missing) > 0 {
		t.Fatalf("tpmtest: %s not found on PATH: install them (%s)", strings.Join(missing, ", "), installHint)
	}
	return paths
}

// proc is a long-running child process whose output goes to a log file in
// the token's directory, quoted when it fails to start.
type proc struct {
	name string
	cmd  *exec.Cmd
	log  string
	done chan struct{} // closed when cmd.Wait returns
	err  error         // cmd.Wait's result, set before done is closed
}

// startProc starts bin with args and registers its stop with t.Cleanup.
// env nil means this process's environment.
func startProc(t testing.TB, dir, name, bin string, env []string, extra []*os.File, args ...string) *proc {
	t.Helper()
	p := &proc{name: name, log: filepath.Join(dir, name+".log"), done: make(chan struct{})}
	logf, err := os.OpenFile(p.log, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer logf.Close() // the child has its own copy
	p.cmd = exec.Command(bin, args...)
	p.cmd.Dir = dir
	p.cmd.Env = env
	p.cmd.Stdout, p.cmd.Stderr = logf, logf
	p.cmd.ExtraFiles = extra
	p.cmd.SysProcAttr = sysProcAttr()
	if err := p.cmd.Start(); err != nil {
		t.Fatalf("tpmtest: start %s: %v", name, err)
	}
	go func() {
		p.err = p.cmd.Wait()
		close(p.done)
	}()
	t.Cleanup(func() { p.stop(t) })
	return p
}

// stop ends the process: SIGTERM, then SIGKILL if it is still there after
// stopGrace. It returns once the process has been reaped.
func (p *proc) stop(t testing.TB) {
	select {
	case <-p.done:
		return
	default:
	}
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
		return
	case <-time.After(stopGrace):
	}
	_ = p.cmd.Process.Kill()
	select {
	case <-p.done:
	case <-time.After(stopGrace):
		t.Errorf("tpmtest: %s (pid %d) still running after SIGKILL", p.name, p.cmd.Process.Pid)
	}
}

// await polls ready until it holds, failing the test if the process exits
// first or startTimeout passes.
func (p *proc) await(t testing.TB, what string, ready func() bool) {
	t.Helper()
	deadline := time.Now().Add(startTimeout)
	for {
		up := ready()
		select {
		case <-p.done:
			t.Fatalf("tpmtest: %s exited (%v) before %s was up; its output:\n%s", p.name, p.err, what, tail(p.log))
		default:
		}
		if up {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("tpmtest: %s: %s not up after %v; its output:\n%s", p.name, what, startTimeout, tail(p.log))
		}
		select {
		case <-p.done:
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// readLine reads the first line p writes to r, within startTimeout.
func readLine(t testing.TB, p *proc, r io.Reader) string {
	t.Helper()
	s, ok := firstLine(r, startTimeout)
	switch {
	case !ok:
		t.Fatalf("tpmtest: %s printed no address within %v; its output:\n%s", p.name, startTimeout, tail(p.log))
	case s == "":
		// The writer closed its end without a line: it is exiting.
		select {
		case <-p.done:
		case <-time.After(stopGrace):
		}
		t.Fatalf("tpmtest: %s printed no address (exit: %v); its output:\n%s", p.name, p.err, tail(p.log))
	}
	return s
}

// firstLine reads r's first line, trimmed (empty if r ends first); ok is
// false if neither happened within d.
func firstLine(r io.Reader, d time.Duration) (line string, ok bool) {
	lines := make(chan string, 1)
	go func() {
		s, _ := bufio.NewReader(r).ReadString('\n')
		lines <- strings.TrimSpace(s)
	}()
	select {
	case s := <-lines:
		return s, true
	case <-time.After(d):
		return "", false
	}
}

// nameHasOwner reports whether name is owned on the session bus of env.
func nameHasOwner(dbusSend string, env []string, name string) bool {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, dbusSend, "--session", "--print-reply", "--dest=org.freedesktop.DBus",
		"/org/freedesktop/DBus", "org.freedesktop.DBus.NameHasOwner", "string:"+name)
	cmd.Env = env
	out, err := cmd.Output()
	return err == nil && bytes.Contains(out, []byte("boolean true"))
}

// run runs a short-lived command to completion within startTimeout.
func run(t testing.TB, dir string, env []string, bin string, args ...string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), startTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, args...)
	cmd.Dir, cmd.Env = dir, env
	cmd.SysProcAttr = sysProcAttr()
	out, err := cmd.CombinedOutput()
	if errors.Is(ctx.Err(), context.DeadlineExceeded) {
		t.Fatalf("tpmtest: %s %s did not finish within %v; its output:\n%s", filepath.Base(bin), args[0], startTimeout, tailBytes(out))
	}
	if err != nil {
		hint := ""
		if bytes.Contains(bytes.ToLower(out), []byte("tcti")) {
			hint = "\n(a missing TCTI library? " + installHint + ")"
		}
		t.Fatalf("tpmtest: %s %s: %v; its output:\n%s%s", filepath.Base(bin), args[0], err, tailBytes(out), hint)
	}
}

// tailMax is how much of a process's output a failure quotes: enough for
// the last few log lines, not a whole trace.
const tailMax = 2048

func tail(path string) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return fmt.Sprintf("(no output: %v)", err)
	}
	return tailBytes(b)
}

func tailBytes(b []byte) string {
	if len(b) > tailMax {
		b = b[len(b)-tailMax:]
	}
	if len(bytes.TrimSpace(b)) == 0 {
		return "(no output)"
	}
	return string(b)
}

func exists(path string) bool {
	_, err := os.Stat(path)
	return err == nil
}

func randomHex(t testing.TB, n int) string {
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(b)
}
