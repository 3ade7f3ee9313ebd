package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// runEnv is runCode with extra environment and without the variables that
// would point kmsctl at a cluster (in-cluster config, $KUBECONFIG), and
// with HOME in a temp folder so ~/.kube/config is missing.
func runEnv(t *testing.T, extra []string, name string, args ...string) (stdout, stderr string, code int) {
	t.Helper()
	cmd := exec.Command(filepath.Join(binDir, name), args...)
	for _, kv := range os.Environ() {
		k, _, _ := strings.Cut(kv, "=")
		switch k {
		case "KUBECONFIG", "KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT", "HOME", "GODEBUG":
			continue
		}
		cmd.Env = append(cmd.Env, kv)
	}
	cmd.Env = append(append(cmd.Env, "HOME="+t.TempDir()), extra...)
	var o, e bytes.Buffer
	cmd.Stdout, cmd.Stderr = &o, &e
	err := cmd.Run()
	var ee *exec.ExitError
	switch {
	case errors.As(err, &ee):
		return o.String(), e.String(), ee.ExitCode()
	case err != nil:
		t.Fatal(err)
	}
	return o.String(), e.String(), 0
}

// TestCLIRefusals: mistakes on the command line exit non-zero with one
// line that names the problem and the fix.
func TestCLIRefusals(t *testing.T) {
	e := newEnv(t, true)
	tests := []struct {
		name string
		bin  string
		args []string
		want []string
	}{
		{"kmsctl unknown command", "kmsctl", []string{"nope"}, []string{`unknown command "nope"`, "kmsctl --help"}},
		{"kmsctl keys unknown command", "kmsctl", []string{"keys", "nope"}, []string{`unknown command "nope" for "kmsctl keys"`, "kmsctl keys --help"}},
		{"kmsctl suggestion", "kmsctl", []string{"keys", "lst"}, []string{"did you mean list?"}},
		{"kms-plugin unknown command", "kms-plugin", []string{"nope"}, []string{`unknown command "nope"`, "kms-plugin --help"}},
		{"kmsctl unknown flag", "kmsctl", []string{"keys", "list", "--bogus"}, []string{"unknown flag: --bogus"}},
		{"kms-plugin unknown flag", "kms-plugin", []string{"doctor", "--bogus"}, []string{"unknown flag: --bogus"}},
		{"doctor without config", "kms-plugin", []string{"doctor"}, []string{"--config is required"}},
		{"keys list -o", "kmsctl", []string{"keys", "list", "--config", e.config, "-o", "yaml"}, []string{`"yaml"`, "want table or json"}},
		{"census -o", "kmsctl", []string{"census", "-o", "yaml"}, []string{`"yaml"`, "want table or json"}},
		{"rotate -o", "kmsctl", []string{"rotate", "-o", "yaml"}, []string{`"yaml"`, "want table or json"}},
		{"kmsctl version -o", "kmsctl", []string{"version", "-o", "yaml"}, []string{`"yaml"`, "want table or json"}},
		{"kms-plugin version -o", "kms-plugin", []string{"version", "-o", "yaml"}, []string{`"yaml"`, "want table or json"}},
		{"metrics-addr on every interface", "kmsctl", []string{"rotate", "--config", e.config, "--etcd-endpoints", "http://127.0.0.1:1", "--metrics-addr", ":9090"}, []string{`--metrics-addr ":9090"`, "loopback", "--metrics-addr-allow-remote"}},
		{"no kubeconfig anywhere", "kmsctl", []string{"census", "--etcd-endpoints", "http://127.0.0.1:1"}, []string{"no kubeconfig", "give --kubeconfig FILE"}},
		{"kubeconfig missing", "kmsctl", []string{"census", "--etcd-endpoints", "http://127.0.0.1:1", "--kubeconfig", filepath.Join(e.dir, "nope")}, []string{"--kubeconfig " + filepath.Join(e.dir, "nope")}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, stderr, code := runEnv(t, nil, tt.bin, tt.args...)
			if code == 0 {
				t.Fatalf("%s %v: exit 0, want non-zero", tt.bin, tt.args)
			}
			lines := nonLogLines(stderr)
			if len(lines) != 1 {
				t.Fatalf("stderr: got %q, want one line", lines)
			}
			for _, w := range tt.want {
				if !strings.Contains(lines[0], w) {
					t.Errorf("stderr %q does not contain %q", lines[0], w)
				}
			}
			if strings.Contains(lines[0], "KUBERNETES_MASTER") {
				t.Errorf("stderr %q names KUBERNETES_MASTER, which kmsctl does not read", lines[0])
			}
		})
	}
}

// TestCLIAccepts: what the shared flags accept.
func TestCLIAccepts(t *testing.T) {
	e := newEnv(t, true)
	t.Run("rotate -o text is an alias of table", func(t *testing.T) {
		_, stderr, _ := runEnv(t, nil, "kmsctl", "rotate", "-o", "text")
		if !strings.Contains(stderr, "--config is required") {
			t.Fatalf("stderr %q: want the flags parsed and --config missing", stderr)
		}
	})
	t.Run("help shows --apiservers URLs", func(t *testing.T) {
		out, _, _ := runEnv(t, nil, "kmsctl", "rotate", "--help")
		if !strings.Contains(out, "--apiservers URLs") || !strings.Contains(out, "-o, --output table|json") {
			t.Fatalf("rotate --help lacks \"--apiservers URLs\" or \"-o, --output table|json\":\n%s", out)
		}
	})
	t.Run("keys without a subcommand prints help", func(t *testing.T) {
		out, _, code := runEnv(t, nil, "kmsctl", "keys")
		if code != 0 || !strings.Contains(out, "Available Commands") {
			t.Fatalf("exit %d, stdout %q", code, out)
		}
	})
	t.Run("keys list -o json", func(t *testing.T) {
		out, _, code := runEnv(t, nil, "kmsctl", "keys", "list", "--config", e.config, "-o", "json")
		var got []map[string]any
		if err := json.Unmarshal([]byte(out), &got); code != 0 || err != nil || len(got) != 1 {
			t.Fatalf("exit %d, %v: %q", code, err, out)
		}
	})
}

// defaultFIPSLine is how version reports FIPS mode with no GODEBUG set:
// off, unless TestMain built the binaries against the FIPS module
// (make test-fips sets GOFIPS140), which turns it on by default.
func defaultFIPSLine() string {
	if v := os.Getenv("GOFIPS140"); v != "" && v != "off" && v != "latest" {
		return "fips140: on (GODEBUG fips140=on, module " + v
	}
	return "fips140: off (GODEBUG fips140=off"
}

func TestVersion(t *testing.T) {
	for _, bin := range []string{"kms-plugin", "kmsctl"} {
		t.Run(bin, func(t *testing.T) {
			out, stderr, code := runEnv(t, nil, bin, "version")
			if code != 0 {
				t.Fatalf("exit %d: %s", code, stderr)
			}
			for _, w := range []string{"version: ", "commit: ", "go: go1.", defaultFIPSLine()} {
				if !strings.Contains(out, w) {
					t.Errorf("version output lacks %q:\n%s", w, out)
				}
			}
			out, stderr, code = runEnv(t, []string{"GODEBUG=fips140=on"}, bin, "version", "-o", "json")
			if code != 0 {
				t.Fatalf("exit %d: %s", code, stderr)
			}
			var got struct {
				Version, Commit, GoVersion, FIPSMode string
				FIPS                                 bool
			}
			if err := json.Unmarshal([]byte(out), &got); err != nil {
				t.Fatalf("%v: %q", err, out)
			}
			if got.Version == "" || got.Commit == "" || !strings.HasPrefix(got.GoVersion, "go1.") || !got.FIPS || got.FIPSMode != "on" {
				t.Fatalf("got %+v, want version, commit, goVersion set and fips on", got)
			}
		})
	}
}
