package tpmtest

import (
	"io"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
)

// storeDB is the SQLite database tpm2-pkcs11 keeps in its store directory.
const storeDB = "tpm2_pkcs11.sqlite3"

// LockStore has another process (the sqlite3 shell) take an exclusive
// lock on the token store's database, as a tpm2-pkcs11 process does for
// the milliseconds it commits an object. tpm2-pkcs11 sets no SQLite busy
// timeout, so while the lock is held every C_Initialize (which reads the
// store) and every object write in any other process fails at once with
// CKR_GENERAL_ERROR. LockStore returns once the lock is held; calling the
// returned function (at the latest, the test's end does) releases it.
func (tp TPM) LockStore(t testing.TB) (release func()) {
	t.Helper()
	return tp.lockStore(t, "EXCLUSIVE")
}

// LockStoreWrites is LockStore with the lock a tpm2-pkcs11 process holds
// while it writes, before it commits: other processes may still read the
// store (C_Initialize works) but not write to it.
func (tp TPM) LockStoreWrites(t testing.TB) (release func()) {
	t.Helper()
	return tp.lockStore(t, "IMMEDIATE")
}

// lockStore holds a transaction of the given SQLite kind open.
func (tp TPM) lockStore(t testing.TB, kind string) (release func()) {
	t.Helper()
	bin := lookPaths(t, "sqlite3")["sqlite3"]
	cmd := exec.Command(bin, "-batch", "-bail", filepath.Join(tp.Dir, "store", storeDB))
	in, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	var stderr strings.Builder
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatalf("tpmtest: start sqlite3: %v", err)
	}
	// BEGIN IMMEDIATE or EXCLUSIVE takes the lock or fails, and -bail
	// ends the shell at a failure, so "locked" is printed only once the
	// lock is ours.
	if _, err := io.WriteString(in, "BEGIN "+kind+";\nSELECT 'locked';\n"); err != nil {
		t.Fatalf("tpmtest: sqlite3: %v", err)
	}
	if s, ok := firstLine(out, startTimeout); s != "locked" {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
		t.Fatalf("tpmtest: sqlite3 did not lock the token store within %v (printed %q, in time: %v): %s", startTimeout, s, ok, stderr.String())
	}
	var once sync.Once
	release = func() {
		once.Do(func() {
			_, _ = io.WriteString(in, "COMMIT;\n")
			_ = in.Close()
			if err := cmd.Wait(); err != nil {
				t.Errorf("tpmtest: sqlite3 holding the token store lock: %v: %s", err, stderr.String())
			}
		})
	}
	t.Cleanup(release)
	return release
}
