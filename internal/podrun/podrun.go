// Package podrun turns one container of a shipped manifest into the shell
// lines that run it as the kubelet would on a node, for tests where no
// kubelet runs: its user, groups and securityContext through setpriv, its
// hostPath volumes bind-mounted at their mount paths (read-only where the
// manifest says so), and a read-only root filesystem where it asks for
// one. The lines are meant for a private mount namespace (unshare
// --mount), so nothing reaches the machine.
//
// What it does not do, and the tests that use it say so: pull an image
// (the binaries come from the checkout), apply seccomp, or limit memory.
package podrun

import (
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"

	batchv1 "k8s.io/api/batch/v1"
	corev1 "k8s.io/api/core/v1"
	"sigs.k8s.io/yaml"
)

// Pod is one container of a pod spec.
type Pod struct {
	Spec      corev1.PodSpec
	Container corev1.Container
}

// FromPodFile reads a Pod manifest (a static pod) and picks container.
func FromPodFile(path, container string) (Pod, error) {
	var pod corev1.Pod
	if err := readStrict(path, &pod); err != nil {
		return Pod{}, err
	}
	return pick(path, pod.Spec, container)
}

// FromCronJobFile reads a CronJob manifest and picks container of its
// job's pod.
func FromCronJobFile(path, container string) (Pod, error) {
	var cj batchv1.CronJob
	if err := readStrict(path, &cj); err != nil {
		return Pod{}, err
	}
	return pick(path, cj.Spec.JobTemplate.Spec.Template.Spec, container)
}

func readStrict(path string, into any) error {
	b, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	if err := yaml.UnmarshalStrict(b, into); err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	return nil
}

func pick(path string, spec corev1.PodSpec, name string) (Pod, error) {
	for _, c := range spec.Containers {
		if c.Name == name {
			return Pod{Spec: spec, Container: c}, nil
		}
	}
	return Pod{}, fmt.Errorf("%s: no container %q", path, name)
}

// Setpriv returns setpriv's options for the container's user and group
// (its own securityContext over the pod's), the pod's supplemental groups,
// and the securityContext the shipped manifests use: every capability
// dropped and none added, no privilege escalation. A manifest that asks
// for anything else is an error: this package would not run it faithfully.
func (p Pod) Setpriv() (string, error) {
	uid, gid, err := p.RunAs()
	if err != nil {
		return "", err
	}
	sc := p.Container.SecurityContext
	if sc == nil || sc.Capabilities == nil || len(sc.Capabilities.Drop) != 1 || sc.Capabilities.Drop[0] != "ALL" || len(sc.Capabilities.Add) != 0 {
		return "", fmt.Errorf("container %s: want capabilities drop [ALL] and none added", p.Container.Name)
	}
	if sc.AllowPrivilegeEscalation == nil || *sc.AllowPrivilegeEscalation {
		return "", fmt.Errorf("container %s: want allowPrivilegeEscalation: false", p.Container.Name)
	}
	groups := "--clear-groups"
	if psc := p.Spec.SecurityContext; psc != nil && len(psc.SupplementalGroups) > 0 {
		gs := make([]string, len(psc.SupplementalGroups))
		for i, g := range psc.SupplementalGroups {
			gs[i] = fmt.Sprint(g)
		}
		groups = "--groups=" + strings.Join(gs, ",")
	}
	return fmt.Sprintf("--reuid=%d --regid=%d %s --inh-caps=-all --ambient-caps=-all --bounding-set=-all --no-new-privs", uid, gid, groups), nil
}

// RunAs is the uid and gid the container runs as: its own securityContext
// over the pod's. Both must be set: the shipped manifests name their user.
func (p Pod) RunAs() (uid, gid int64, err error) {
	var u, g *int64
	if psc := p.Spec.SecurityContext; psc != nil {
		u, g = psc.RunAsUser, psc.RunAsGroup
	}
	if sc := p.Container.SecurityContext; sc != nil {
		if sc.RunAsUser != nil {
			u = sc.RunAsUser
		}
		if sc.RunAsGroup != nil {
			g = sc.RunAsGroup
		}
	}
	if u == nil || g == nil {
		return 0, 0, fmt.Errorf("container %s: runAsUser and runAsGroup must be set (an explicit user)", p.Container.Name)
	}
	return *u, *g, nil
}

// HostPath is the host path of the pod's hostPath volume name, or "".
func (p Pod) HostPath(name string) string {
	if v := p.volume(name); v != nil && v.HostPath != nil {
		return v.HostPath.Path
	}
	return ""
}

// Mounts returns the lines that bind-mount every hostPath volume the
// container mounts. host maps a hostPath to the file or folder standing
// for it here; nil means the hostPaths themselves (on a sandboxed node).
// With a map, a hostPath missing from it is an error: the pod would not
// start without it. Other volume types are errors too.
func (p Pod) Mounts(host map[string]string) (string, error) {
	var b strings.Builder
	for _, m := range p.Container.VolumeMounts {
		v := p.volume(m.Name)
		if v == nil || v.HostPath == nil {
			return "", fmt.Errorf("container %s: volume %s is not a hostPath volume", p.Container.Name, m.Name)
		}
		src := v.HostPath.Path
		if host != nil {
			s, ok := host[src]
			if !ok {
				return "", fmt.Errorf("container %s mounts host path %s (volume %s), which is not laid out here", p.Container.Name, src, m.Name)
			}
			src = s
		}
		b.WriteString(BindLines(src, m.MountPath, m.ReadOnly))
	}
	return b.String(), nil
}

func (p Pod) volume(name string) *corev1.Volume {
	for i := range p.Spec.Volumes {
		if p.Spec.Volumes[i].Name == name {
			return &p.Spec.Volumes[i]
		}
	}
	return nil
}

// ReadOnlyRoot returns the lines that make every other mount of the
// namespace read-only when the container asks for a read-only root
// filesystem: everything but the container's writable volume mounts and
// the kernel's /proc, /sys and /dev. It must come after Mounts.
func (p Pod) ReadOnlyRoot() string {
	sc := p.Container.SecurityContext
	if sc == nil || sc.ReadOnlyRootFilesystem == nil || !*sc.ReadOnlyRootFilesystem {
		return ""
	}
	var keep []string
	for _, m := range p.Container.VolumeMounts {
		if !m.ReadOnly {
			keep = append(keep, m.MountPath)
		}
	}
	sort.Strings(keep)
	return fmt.Sprintf(`keep=%q
for m in $(findmnt -rno TARGET | sort -u); do
  case "$m" in /proc|/proc/*|/sys|/sys/*|/dev|/dev/*) continue ;; esac
  rw=0; for k in $keep; do [ "$(realpath -m "$k")" = "$m" ] && rw=1; done
  [ "$rw" = 1 ] || mount -o remount,bind,ro "$m"
done
`, strings.Join(keep, " "))
}

// OverlayLines are the lines that lay a writable overlay over dir, its
// changes kept in scratch: mount points made under dir afterwards never
// reach the machine.
func OverlayLines(dir, scratch string) string {
	return fmt.Sprintf("mkdir -p %[1]q/u %[1]q/w; mount -t overlay overlay -o lowerdir=%[2]s,upperdir=%[1]s/u,workdir=%[1]s/w %[2]q\n", scratch, dir)
}

// BindLines are the lines that bind-mount src at dst, made first as a
// folder or an empty file like src, and read-only if ro.
func BindLines(src, dst string, ro bool) string {
	var b strings.Builder
	if fi, err := os.Stat(src); err == nil && fi.IsDir() {
		fmt.Fprintf(&b, "mkdir -p %q\n", dst)
	} else {
		fmt.Fprintf(&b, "mkdir -p %q; [ -e %q ] || touch %q\n", filepath.Dir(dst), dst, dst)
	}
	fmt.Fprintf(&b, "mount --bind %q %q\n", src, dst)
	if ro {
		fmt.Fprintf(&b, "mount -o remount,bind,ro %q\n", dst)
	}
	return b.String()
}

// Script returns the lines that start the container in the current mount
// namespace: Mounts(host), then ReadOnlyRoot, then exec setpriv with
// Setpriv's options and Argv(entrypoint). It is meant for bash -euo
// pipefail inside unshare --mount.
func (p Pod) Script(host map[string]string, entrypoint ...string) (string, error) {
	setpriv, err := p.Setpriv()
	if err != nil {
		return "", err
	}
	mounts, err := p.Mounts(host)
	if err != nil {
		return "", err
	}
	return mounts + p.ReadOnlyRoot() + "exec setpriv " + setpriv + " " + Quote(p.Argv(entrypoint...)) + "\n", nil
}

// Argv is the container's command line: its command (or the image's
// entrypoint when it has none) and its args.
func (p Pod) Argv(entrypoint ...string) []string {
	argv := p.Container.Command
	if len(argv) == 0 {
		argv = entrypoint
	}
	return append(append([]string{}, argv...), p.Container.Args...)
}

// Quote joins args for a shell, each in single quotes.
func Quote(args []string) string {
	q := make([]string, len(args))
	for i, a := range args {
		q[i] = "'" + strings.ReplaceAll(a, "'", `'\''`) + "'"
	}
	return strings.Join(q, " ")
}
