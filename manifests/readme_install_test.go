package manifests

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/kms-v2/kms-plugin/internal/readme"
)

// readmeBlock returns the README block marked name (internal/readme), or
// fails the test.
func readmeBlock(t *testing.T, name string) string {
	t.Helper()
	block, err := readme.Block("../README.md", name)
	if err != nil {
		t.Fatal(err)
	}
	return block
}

// nodeSandbox makes the real /etc, /usr/local/bin and /run writable only
// inside this mount namespace (overlays and a tmpfs; nothing reaches the
// machine), gives it its own loopback (the shipped health port cannot clash
// with another test), and puts the freshly built binaries where the README
// expects them (bin/ in the checkout).
const nodeSandbox = `
for d in /etc /usr/local/bin; do
  u="$SANDBOX/upper$d" w="$SANDBOX/work$d"; mkdir -p "$u" "$w"
  mount -t overlay overlay -o "lowerdir=$d,upperdir=$u,workdir=$w" "$d"
done
mount -t tmpfs -o mode=0755 tmpfs /run
ip link set lo up
mount --bind "$BUILT" "$REPO/bin"
cd "$REPO"
`

// afterInstall starts the plugin as the static pod would run it (uid and
// gid 65532, no extra groups, the installed config) and checks it with
// doctor once it serves.
const afterInstall = `
echo "=== installed"
stat -c '%n %U:%G %a' /run/kms-plugin /etc/kms-plugin /etc/kms-plugin/keyset.json
setpriv --reuid=65532 --regid=65532 --clear-groups --no-new-privs kms-plugin serve --config /etc/kms-plugin/config.yaml >"$SANDBOX/serve.log" 2>&1 &
pid=$!
for i in $(seq 150); do [ -S /var/run/kms-plugin/kms.sock ] && break; sleep 0.2; done
sleep 1
echo "=== doctor while serving"
rc=0
runuser -u kms-plugin -- kms-plugin doctor --config /etc/kms-plugin/config.yaml \
  --encryption-config /etc/kubernetes/enc/encryption-config.yaml || rc=$?
kill "$pid"; wait "$pid" || true
exit "$rc"
`

// TestReadmeInstallNode runs the README's "Install on kubeadm" node block
// verbatim as root in a sandbox over this machine's real /etc and /run,
// then runs the plugin as uid 65532 on what it installed: the socket folder
// from tmpfiles.d, the keyset in its root:65532 0640 shape, the shipped
// config. Every doctor line must then be ok.
func TestReadmeInstallNode(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("the README's install block runs as root")
	}
	systemdAnalyze(t) // installs the systemd package (sysusers, tmpfiles) when it can
	for _, tool := range []string{"unshare", "runuser", "setpriv", "ip", "systemd-sysusers", "systemd-tmpfiles"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Fatalf("%s is needed to run the README's install block: %v", tool, err)
		}
	}
	repo, err := filepath.Abs("..")
	if err != nil {
		t.Fatal(err)
	}
	built := t.TempDir()
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Minute)
	defer cancel()
	if out, err := exec.CommandContext(ctx, "go", "build", "-o", built+"/", "../cmd/kms-plugin", "../cmd/kmsctl").CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	if err := os.MkdirAll(filepath.Join(repo, "bin"), 0o755); err != nil {
		t.Fatal(err)
	}
	sandbox := t.TempDir()
	script := "set -euo pipefail\n" + nodeSandbox + "echo '=== README block'\nset -x\n" + readmeBlock(t, "install-node") + "set +x\n" + afterInstall
	cmd := exec.CommandContext(ctx, "unshare", "--mount", "--net", "--propagation", "private", "bash", "-c", script)
	cmd.Env = append(os.Environ(), "SANDBOX="+sandbox, "BUILT="+built, "REPO="+repo)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	err = cmd.Run()
	log := out.String()
	if err != nil {
		serve, _ := os.ReadFile(filepath.Join(sandbox, "serve.log"))
		t.Fatalf("README install block, then the plugin as 65532: %v\n%s\n--- kms-plugin serve:\n%s", err, log, serve)
	}
	t.Log(log)
	for _, want := range []string{"/run/kms-plugin kms-plugin:kms-plugin 750", "/etc/kms-plugin root:kms-plugin 750", "/etc/kms-plugin/keyset.json root:kms-plugin 640"} {
		if !strings.Contains(log, want+"\n") {
			t.Errorf("after the README block: want %q", want)
		}
	}
	_, serving, _ := strings.Cut(log, "=== doctor while serving\n")
	checkDoctorAllOK(t, serving)
}

// checkDoctorAllOK: doctor printed checks, and every one is ok.
func checkDoctorAllOK(t *testing.T, out string) {
	t.Helper()
	n := 0
	for _, l := range strings.Split(strings.TrimSpace(out), "\n") {
		switch {
		case strings.HasPrefix(l, "ok "):
			n++
		case strings.HasPrefix(l, "warn "), strings.HasPrefix(l, "fail "):
			t.Errorf("doctor, with the plugin serving as installed: %s", l)
		}
	}
	if n < 5 {
		t.Errorf("doctor printed %d ok lines, want every check (>= 5):\n%s", n, out)
	}
}
