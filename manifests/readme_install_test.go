package manifests

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"

	"github.com/kms-v2/kms-plugin/internal/podrun"
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
mkdir -p /etc/kubernetes/manifests # kubeadm's, on a control-plane node
ip link set lo up
mount --bind "$BUILT" "$REPO/bin"
cd "$REPO"
`

// staticPodEntrypoint is the release image's entrypoint (build/image, and
// the Dockerfile, which TestDockerfileInStep keeps in step): the static
// pod gives only args. Step 1 installed the binary at that path.
var staticPodEntrypoint = []string{"/usr/local/bin/kms-plugin"}

// afterInstall plays the kubelet's part for the static pod that the
// README's step 2 installed: the installed manifest must be the shipped
// one; its container runs as the manifest says (internal/podrun) in a
// mount namespace of its own, and its startupProbe and readinessProbe must
// pass. Then the README's check runs, and doctor as the plugin's user.
func afterInstall(t *testing.T) string {
	t.Helper()
	pod, err := podrun.FromPodFile("kms-plugin-static-pod.yaml", "kms-plugin")
	if err != nil {
		t.Fatal(err)
	}
	container, err := pod.Script(nil, staticPodEntrypoint...)
	if err != nil {
		t.Fatalf("the static pod: %v", err)
	}
	return `
echo "=== installed"
stat -c '%n %U:%G %a' /run/kms-plugin /etc/kms-plugin /etc/kms-plugin/keyset.json
cmp manifests/kms-plugin-static-pod.yaml /etc/kubernetes/manifests/kms-plugin.yaml
echo "=== the kubelet's part: the static pod's container"
unshare --mount --propagation private bash -euo pipefail -c ` + podrun.Quote([]string{container}) + ` >"$SANDBOX/serve.log" 2>&1 &
pid=$!
` + probeLines(t, "startupProbe", pod.Container.StartupProbe) + probeLines(t, "readinessProbe", pod.Container.ReadinessProbe) + `
echo "=== README check"
` + readmeBlock(t, "check-static-pod") + `echo
echo "=== doctor while serving"
rc=0
runuser -u kms-plugin -- kms-plugin doctor --config /etc/kms-plugin/config.yaml \
  --encryption-config /etc/kubernetes/enc/encryption-config.yaml || rc=$?
kill "$pid"; wait "$pid" || true
exit "$rc"
`
}

// probeLines polls an httpGet probe as the kubelet would: every
// periodSeconds, failing after failureThreshold misses.
func probeLines(t *testing.T, name string, p *corev1.Probe) string {
	t.Helper()
	if p == nil || p.HTTPGet == nil {
		t.Fatalf("the static pod has no httpGet %s", name)
	}
	g := p.HTTPGet
	url := fmt.Sprintf("http://%s:%s%s", g.Host, g.Port.String(), g.Path)
	period, tries := max(p.PeriodSeconds, 1), max(p.FailureThreshold, 3)
	return fmt.Sprintf(`for i in $(seq %[1]d); do
  if curl -fsS -o /dev/null --max-time %[2]d %[3]q; then echo "%[4]s %[3]s: ok after $i"; break; fi
  [ "$i" = %[1]d ] && { echo "%[4]s %[3]s failed %[1]d times"; exit 1; }
  sleep %[5]d
done
`, tries, max(p.TimeoutSeconds, 1), url, name, period)
}

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
	script := "set -euo pipefail\n" + nodeSandbox + "echo '=== README blocks'\nset -x\n" + readmeBlock(t, "install-node") + readmeBlock(t, "install-static-pod") + "set +x\n" + afterInstall(t)
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
