package main

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// doctorEnv is an installation with a health address and an
// EncryptionConfiguration whose kms provider has the given endpoint.
func doctorEnv(t *testing.T, endpoint string) (e env, health, encConfig string) {
	t.Helper()
	e = newEnv(t, false)
	health = freeTCPAddr(t)
	e.writeConfig(t, fmt.Sprintf("socket: %s\nhealth: %s\nrefreshInterval: 200ms\ncheckInterval: 200ms\nprovider:\n  file:\n    path: keyset.json\n", e.socket, health))
	run(t, "kmsctl", "keys", "init", "--config", e.config)
	if endpoint == "" {
		endpoint = "unix://" + e.socket
	}
	encConfig = filepath.Join(e.dir, "encryption-config.yaml")
	body := fmt.Sprintf(`apiVersion: apiserver.config.k8s.io/v1
kind: EncryptionConfiguration
resources:
  - resources: ["secrets"]
    providers:
      - kms:
          apiVersion: v2
          name: kms-plugin
          endpoint: %s
          timeout: 3s
      - identity: {}
`, endpoint)
	if err := os.WriteFile(encConfig, []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
	return e, health, encConfig
}

// doctorLines runs doctor and returns its check lines by check name.
func doctorLines(t *testing.T, args ...string) (lines map[string]string, out string, code int) {
	t.Helper()
	stdout, stderr, code := runCode("kms-plugin", append([]string{"doctor"}, args...)...)
	lines = map[string]string{}
	for _, l := range strings.Split(strings.TrimSpace(stdout), "\n") {
		level, rest, _ := strings.Cut(l, " ")
		check, _, ok := strings.Cut(rest, ": ")
		if !ok || (level != "ok" && level != "warn" && level != "fail") {
			t.Fatalf("doctor line %q is not \"ok|warn|fail CHECK: DETAIL\"\nstdout:\n%s", l, stdout)
		}
		lines[check] = l
	}
	return lines, stdout + stderr, code
}

func TestDoctor(t *testing.T) {
	tests := []struct {
		name string
		// setup prepares the installation and returns doctor's arguments.
		setup    func(t *testing.T) []string
		wantCode int
		// want maps a check to a prefix of its line.
		want map[string]string
		// allOK asks that every line is ok.
		allOK bool
	}{{
		name: "healthy setup",
		setup: func(t *testing.T) []string {
			e, health, enc := doctorEnv(t, "")
			startPlugin(t, e)
			waitHTTP(t, "http://"+health+"/readyz")
			return []string{"--config", e.config, "--encryption-config", enc}
		},
		allOK: true,
		want: map[string]string{
			"config": "ok config", "provider file": "ok provider file: primary file:", "socket folder": "ok socket folder",
			"plugin": "ok plugin: Status on", "health": "ok health: GET", "encryption-config resources[0] (secrets)": "ok encryption-config",
		},
	}, {
		name: "world-readable keyset",
		setup: func(t *testing.T) []string {
			e, _, _ := doctorEnv(t, "")
			if err := os.Chmod(e.keyset, 0o644); err != nil {
				t.Fatal(err)
			}
			return []string{"--config", e.config}
		},
		wantCode: 1,
		want:     map[string]string{"provider file": "fail provider file: ", "config": "ok config"},
	}, {
		name: "plugin not running",
		setup: func(t *testing.T) []string {
			e, _, enc := doctorEnv(t, "")
			return []string{"--config", e.config, "--encryption-config", enc}
		},
		want: map[string]string{"plugin": "warn plugin: not running", "health": "warn health: not running", "provider file": "ok provider file"},
	}, {
		name: "wrong endpoint in encryption config",
		setup: func(t *testing.T) []string {
			e, _, enc := doctorEnv(t, "unix:///var/run/other/kms.sock")
			return []string{"--config", e.config, "--encryption-config", enc}
		},
		wantCode: 1,
		want:     map[string]string{"encryption-config": "fail encryption-config: "},
	}}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			args := tt.setup(t)
			lines, out, code := doctorLines(t, args...)
			if code != tt.wantCode {
				t.Fatalf("exit code: got %d, want %d\n%s", code, tt.wantCode, out)
			}
			for check, prefix := range tt.want {
				if got := lines[check]; !strings.HasPrefix(got, prefix) {
					t.Errorf("check %q: got line %q, want prefix %q\n%s", check, got, prefix, out)
				}
			}
			if tt.allOK {
				for _, l := range lines {
					if !strings.HasPrefix(l, "ok ") {
						t.Errorf("got %q, want every line ok\n%s", l, out)
					}
				}
			}
		})
	}
}

// TestDoctorNamesTheFix checks the fail lines' details: the fix for a
// world-readable keyset, and the endpoint the apiserver must use.
func TestDoctorNamesTheFix(t *testing.T) {
	e, _, _ := doctorEnv(t, "unix:///var/run/other/kms.sock")
	enc := filepath.Join(e.dir, "encryption-config.yaml")
	if err := os.Chmod(e.keyset, 0o644); err != nil {
		t.Fatal(err)
	}
	lines, out, _ := doctorLines(t, "--config", e.config, "--encryption-config", enc)
	if got, want := lines["provider file"], "run chmod 600 "+e.keyset; !strings.Contains(got, want) {
		t.Errorf("provider line %q does not contain %q", got, want)
	}
	if got, want := lines["encryption-config"], "set endpoint: unix://"+e.socket; !strings.Contains(got, want) {
		t.Errorf("encryption-config line %q does not contain %q", got, want)
	}
	if !strings.Contains(out, "unix:///var/run/other/kms.sock") {
		t.Errorf("output does not name the endpoint found:\n%s", out)
	}
}
