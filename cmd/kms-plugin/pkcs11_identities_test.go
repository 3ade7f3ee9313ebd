package main

import (
	"path/filepath"
	"strings"
	"testing"

	"github.com/kms-v2/kms-plugin/providers/pkcs11/pkcs11test"
)

// TestPKCS11IdentityConfigsOnSoftHSM runs the real binaries with the
// shipped PKCS#11 identity configs (manifests/identities/pkcs11-*.yaml)
// pointed at a SoftHSM2 token; only module, token label, PIN file, socket
// and health address change. SoftHSM2 has no use-only role, so the
// plugin's config fails at its first login, in one line naming
// pkcs11.userType, for doctor and for a kmsctl run with it, and changes
// nothing. With userType set to user, as docs/identities.md says to on
// such tokens, the plugin serves and follows what kmsctl's config creates
// and promotes.
func TestPKCS11IdentityConfigsOnSoftHSM(t *testing.T) {
	tk := pkcs11test.NewToken(t, "")
	t.Setenv("SOFTHSM2_CONF", tk.ConfPath)
	dir := t.TempDir()
	kmsctlConfig := filepath.Join(dir, "kmsctl.yaml")
	writePKCS11Identity(t, kmsctlConfig, readIdentityConfig(t, "pkcs11-kmsctl-config.yaml"), tk, "")
	pe := env{dir: dir, config: filepath.Join(dir, "plugin.yaml"), socket: filepath.Join(dir, "run", "kms.sock")}
	pluginShipped := readIdentityConfig(t, "pkcs11-plugin-config.yaml")
	writePKCS11Identity(t, pe.config, pluginShipped, tk, pe.socket)

	first := strings.TrimSpace(run(t, "kmsctl", "keys", "init", "--config", kmsctlConfig))
	before := run(t, "kmsctl", "keys", "list", "--config", kmsctlConfig, "-o", "json")
	for _, args := range [][]string{
		{"kms-plugin", "doctor", "--config", pe.config},
		{"kmsctl", "keys", "create", "--config", pe.config},
	} {
		out, stderr, code := runCode(args[0], args[1:]...)
		msg := out + stderr
		if code == 0 || !strings.Contains(msg, "pkcs11.userType") || !strings.Contains(msg, "no cryptoUser role") {
			t.Fatalf("%s with the plugin's cryptoUser config on SoftHSM2: exit %d, want non-zero and a line naming pkcs11.userType:\n%s",
				strings.Join(args[:2], " "), code, msg)
		}
		t.Logf("%s: exit %d:\n%s", strings.Join(args[:2], " "), code, msg)
	}
	if lines := nonLogLines(runStderr(t, "kmsctl", "keys", "create", "--config", pe.config)); len(lines) != 1 {
		t.Errorf("kmsctl with the plugin's config printed %d lines, want one: %q", len(lines), lines)
	}
	if after := run(t, "kmsctl", "keys", "list", "--config", kmsctlConfig, "-o", "json"); after != before {
		t.Fatalf("the refused commands changed the token:\nbefore %s\nafter %s", before, after)
	}

	providerSection(t, pluginShipped, "pkcs11")["userType"] = "user"
	writePKCS11Identity(t, pe.config, pluginShipped, tk, pe.socket)
	startPlugin(t, pe)
	svc := client(t, pe)
	waitForKeyID(t, svc, first)
	roundTripVia(t, svc, first)
	second := strings.TrimSpace(run(t, "kmsctl", "keys", "create", "--config", kmsctlConfig))
	run(t, "kmsctl", "keys", "promote", "--config", kmsctlConfig, second)
	waitForKeyID(t, svc, second)
	roundTripVia(t, svc, second)
}

// runStderr runs a binary expected to fail and returns its stderr.
func runStderr(t *testing.T, name string, args ...string) string {
	t.Helper()
	_, stderr, code := runCode(name, args...)
	if code == 0 {
		t.Fatalf("%s %s succeeded, want a failure", name, strings.Join(args, " "))
	}
	return stderr
}

// writePKCS11Identity writes a shipped PKCS#11 identity config pointed at
// the SoftHSM2 token tk: module, token label and PIN file change (on
// SoftHSM2 both roles share the one user PIN), and for a plugin that
// serves the socket and health address; userType and key label stay.
func writePKCS11Identity(t *testing.T, path string, shipped map[string]any, tk pkcs11test.Token, socket string) {
	t.Helper()
	c := copyConfig(t, shipped)
	s := providerSection(t, c, "pkcs11")
	s["module"], s["tokenLabel"], s["pinFile"] = tk.Module, tk.Label, tk.PinFile
	if socket != "" {
		c["socket"], c["health"] = socket, freeTCPAddr(t)
		c["refreshInterval"], c["checkInterval"] = "200ms", "200ms"
	}
	writeConfig(t, path, c)
}
