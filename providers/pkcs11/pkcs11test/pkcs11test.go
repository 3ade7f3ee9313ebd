// Package pkcs11test makes throwaway SoftHSM2 tokens for tests of the PKCS#11
// provider and for the end-to-end harness that runs kms-plugin processes
// against one.
//
// Each token lives in its own temporary directory with its own
// softhsm2.conf; the SOFTHSM2_CONF environment variable of the test process
// points at it (t.Setenv), and Token.Env gives the same setting to child
// processes. SoftHSM2 reads SOFTHSM2_CONF when the module is initialized, so
// a test must close every provider of one token before it makes the next
// token (package pkcs11 finalizes the module when its last user closes).
package pkcs11test

import (
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
)

// Token is a freshly initialized SoftHSM2 token with a user PIN.
type Token struct {
	// ConfPath is the softhsm2.conf naming this token's directory.
	ConfPath string
	// Module is the absolute path of libsofthsm2.so.
	Module string
	// Label is the token label (pkcs11.tokenLabel).
	Label string
	// PIN is the user PIN.
	PIN string
	// PinFile holds PIN and a newline, with mode 0600 (pkcs11.pinFile).
	PinFile string
	// SOPIN is the security officer PIN.
	SOPIN string
}

// Env returns the environment entry a child process needs to see this
// token: "SOFTHSM2_CONF=<ConfPath>".
func (tk Token) Env() string { return "SOFTHSM2_CONF=" + tk.ConfPath }

// ProviderYAML is the body of a plugin config's `provider:` section for
// this token, with key objects labelled keyLabel-<n>.
func (tk Token) ProviderYAML(keyLabel string) string {
	return fmt.Sprintf("pkcs11:\n  module: %s\n  tokenLabel: %s\n  pinFile: %s\n  keyLabel: %s\n", tk.Module, tk.Label, tk.PinFile, keyLabel)
}

// moduleCandidates are where distributions install SoftHSM2's module.
var moduleCandidates = []string{
	"/usr/lib/softhsm/libsofthsm2.so",
	"/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
	"/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
	"/usr/lib64/pkcs11/libsofthsm2.so",
	"/usr/lib/pkcs11/libsofthsm2.so",
	"/usr/local/lib/softhsm/libsofthsm2.so",
	"/opt/homebrew/lib/softhsm/libsofthsm2.so",
}

// Module returns the path of libsofthsm2.so: $SOFTHSM2_MODULE if set, else
// the first of the usual install locations that exists. It fails the test
// (rather than skipping it) when SoftHSM2 is missing, so a CI machine
// without it cannot pass silently.
func Module(t testing.TB) string {
	t.Helper()
	if m := os.Getenv("SOFTHSM2_MODULE"); m != "" {
		return m
	}
	for _, m := range moduleCandidates {
		if _, err := os.Stat(m); err == nil {
			return m
		}
	}
	t.Fatalf("libsofthsm2.so not found (looked in %v); install SoftHSM2 (apt-get install -y softhsm2) or set SOFTHSM2_MODULE", moduleCandidates)
	return ""
}

func randomHex(t testing.TB, n int) string {
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(b)
}

// NewToken creates a token labelled label (a random one if empty) in a new
// temporary directory, points SOFTHSM2_CONF at it for the rest of the test
// (so providers in this process see it; t.Setenv rules out t.Parallel), and
// writes the user PIN to a 0600 file.
func NewToken(t testing.TB, label string) Token {
	t.Helper()
	tk := NewDetachedToken(t, label)
	t.Setenv("SOFTHSM2_CONF", tk.ConfPath)
	return tk
}

// NewDetachedToken is NewToken without touching this process's
// environment, for tests that use the token only from child processes
// (give them Token.Env) and may run in parallel.
func NewDetachedToken(t testing.TB, label string) Token {
	t.Helper()
	if label == "" {
		label = "kms-" + randomHex(t, 4)
	}
	util, err := exec.LookPath("softhsm2-util")
	if err != nil {
		t.Fatalf("softhsm2-util not found: install SoftHSM2 (apt-get install -y softhsm2): %v", err)
	}
	// Not t.TempDir(): its name comes from the test name, which may contain
	// '=' (sub-benchmarks), and SoftHSM2's config parser splits on '='.
	dir, err := os.MkdirTemp("", "softhsm")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	tokens := filepath.Join(dir, "tokens")
	if err := os.Mkdir(tokens, 0o700); err != nil {
		t.Fatal(err)
	}
	tk := Token{
		ConfPath: filepath.Join(dir, "softhsm2.conf"),
		Module:   Module(t),
		Label:    label,
		PIN:      randomHex(t, 8),
		PinFile:  filepath.Join(dir, "pin"),
		SOPIN:    randomHex(t, 8),
	}
	conf := fmt.Sprintf("directories.tokendir = %s\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n", tokens)
	if err := os.WriteFile(tk.ConfPath, []byte(conf), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(tk.PinFile, []byte(tk.PIN+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(util, "--init-token", "--free", "--label", label, "--so-pin", tk.SOPIN, "--pin", tk.PIN)
	cmd.Env = append(os.Environ(), tk.Env())
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("softhsm2-util --init-token: %v\n%s", err, out)
	}
	return tk
}
