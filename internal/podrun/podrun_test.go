package podrun

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
)

func ptr[T any](v T) *T { return &v }

// pod is a container as the shipped manifests write one: an explicit
// user, no capabilities, no privilege escalation, a read-only root, one
// read-write and one read-only hostPath volume.
func pod(rw, ro string) Pod {
	return Pod{
		Spec: corev1.PodSpec{
			SecurityContext: &corev1.PodSecurityContext{RunAsUser: ptr[int64](65532), RunAsGroup: ptr[int64](65532), SupplementalGroups: []int64{7, 8}},
			Volumes: []corev1.Volume{
				{Name: "rw", VolumeSource: corev1.VolumeSource{HostPath: &corev1.HostPathVolumeSource{Path: rw}}},
				{Name: "ro", VolumeSource: corev1.VolumeSource{HostPath: &corev1.HostPathVolumeSource{Path: ro}}},
			},
		},
		Container: corev1.Container{
			Name: "c", Args: []string{"serve", "--config", "it's.yaml"},
			SecurityContext: &corev1.SecurityContext{
				AllowPrivilegeEscalation: ptr(false), ReadOnlyRootFilesystem: ptr(true),
				Capabilities: &corev1.Capabilities{Drop: []corev1.Capability{"ALL"}},
			},
			VolumeMounts: []corev1.VolumeMount{{Name: "rw", MountPath: rw}, {Name: "ro", MountPath: ro, ReadOnly: true}},
		},
	}
}

func TestSetpriv(t *testing.T) {
	got, err := pod("/a", "/b").Setpriv()
	want := "--reuid=65532 --regid=65532 --groups=7,8 --inh-caps=-all --ambient-caps=-all --bounding-set=-all --no-new-privs"
	if err != nil || got != want {
		t.Errorf("Setpriv() = %q, %v; want %q", got, err, want)
	}
	for name, breakIt := range map[string]func(*Pod){
		"no user":                 func(p *Pod) { p.Spec.SecurityContext.RunAsUser = nil },
		"a capability added":      func(p *Pod) { p.Container.SecurityContext.Capabilities.Add = []corev1.Capability{"NET_ADMIN"} },
		"privilege escalation on": func(p *Pod) { p.Container.SecurityContext.AllowPrivilegeEscalation = ptr(true) },
	} {
		p := pod("/a", "/b")
		breakIt(&p)
		if _, err := p.Setpriv(); err == nil {
			t.Errorf("%s: Setpriv accepted it", name)
		}
	}
}

func TestArgvAndQuote(t *testing.T) {
	if got := Quote(pod("/a", "/b").Argv("/bin/x")); got != `'/bin/x' 'serve' '--config' 'it'\''s.yaml'` {
		t.Errorf("Quote(Argv) = %s", got)
	}
}

func TestMountsNeedEveryHostPath(t *testing.T) {
	if _, err := pod("/a", "/b").Mounts(map[string]string{"/a": "/here/a"}); err == nil || !strings.Contains(err.Error(), "/b") {
		t.Errorf("Mounts with /b not laid out: %v, want an error naming /b", err)
	}
}

// TestReadOnlyRoot runs the lines for real in a mount namespace: the
// read-write volume takes writes, the read-only one and the rest of the
// filesystem refuse them.
func TestReadOnlyRoot(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("mount namespaces need root")
	}
	dir := t.TempDir()
	rw, ro, other := filepath.Join(dir, "rw"), filepath.Join(dir, "ro"), filepath.Join(dir, "other")
	for _, d := range []string{rw, ro, other} {
		if err := os.Mkdir(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	p := pod(rw, ro)
	mounts, err := p.Mounts(nil)
	if err != nil {
		t.Fatal(err)
	}
	script := mounts + p.ReadOnlyRoot() + `
touch "$RW/f"
! touch "$RO/f" 2>/dev/null || { echo "the read-only volume took a write"; exit 1; }
! touch "$OTHER/f" 2>/dev/null || { echo "the root filesystem took a write"; exit 1; }
`
	cmd := exec.Command("unshare", "--mount", "--propagation", "private", "bash", "-euo", "pipefail", "-c", script)
	cmd.Env = append(os.Environ(), "RW="+rw, "RO="+ro, "OTHER="+other)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	if _, err := os.Stat(filepath.Join(rw, "f")); err != nil {
		t.Errorf("the write to the read-write volume did not reach it: %v", err)
	}
}
