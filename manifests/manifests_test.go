package manifests

import (
	"bufio"
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"

	corev1 "k8s.io/api/core/v1"
	"sigs.k8s.io/yaml"

	"github.com/kms-v2/kms-plugin/internal/podrun"
)

const (
	unitName = "kms-plugin.service"
	// maxExposure is the bound on systemd-analyze's overall exposure level
	// (0.0 to 10.0) for the unit as shipped.
	maxExposure = 2.0
	// dropinDir holds the optional drop-ins. It is deliberately not named
	// kms-plugin.service.d: systemd-analyze (and systemd) would merge every
	// drop-in found next to the unit, and these are opt-ins.
	dropinDir = "kms-plugin.dropins"
)

// The ExecStart and config path the README documents.
const wantExecStart = "/usr/local/bin/kms-plugin serve --config /etc/kms-plugin/config.yaml"

var (
	analyzeOnce sync.Once
	analyzePath string
	analyzeWhy  string
)

// systemdAnalyze returns the path of systemd-analyze. When it is missing
// and the test runs as root on a machine with apt-get, it installs the
// Debian package that provides it (systemd), as `make deps` does; otherwise
// the test is skipped with the reason.
func systemdAnalyze(t *testing.T) string {
	t.Helper()
	analyzeOnce.Do(func() {
		if p, err := exec.LookPath("systemd-analyze"); err == nil {
			analyzePath = p
			return
		}
		apt, err := exec.LookPath("apt-get")
		if err != nil || os.Geteuid() != 0 {
			analyzeWhy = "systemd-analyze is not installed and cannot be installed here (needs root and apt-get); install the systemd package (or run make deps)"
			return
		}
		t.Logf("systemd-analyze missing: installing the systemd package with apt-get")
		for _, args := range [][]string{{"update", "-qq"}, {"install", "-y", "-qq", "systemd"}} {
			cmd := exec.Command(apt, args...)
			cmd.Env = append(os.Environ(), "DEBIAN_FRONTEND=noninteractive")
			if out, err := cmd.CombinedOutput(); err != nil {
				analyzeWhy = fmt.Sprintf("systemd-analyze is not installed and apt-get %s failed: %v\n%s", args[0], err, out)
				return
			}
		}
		if p, err := exec.LookPath("systemd-analyze"); err == nil {
			analyzePath = p
			return
		}
		analyzeWhy = "systemd-analyze is still missing after apt-get install systemd"
	})
	if analyzePath == "" {
		t.Skip(analyzeWhy)
	}
	return analyzePath
}

// unitDir copies the unit, and the named drop-ins into
// kms-plugin.service.d beside it, into a fresh folder and returns the
// unit's path there, so systemd-analyze sees exactly these files.
func unitDir(t *testing.T, dropins ...string) string {
	t.Helper()
	dir := t.TempDir()
	unit := filepath.Join(dir, unitName)
	copyFile(t, unitName, unit)
	if len(dropins) > 0 {
		d := filepath.Join(dir, unitName+".d")
		if err := os.Mkdir(d, 0o755); err != nil {
			t.Fatal(err)
		}
		for _, name := range dropins {
			copyFile(t, filepath.Join(dropinDir, name), filepath.Join(d, name))
		}
	}
	return unit
}

func copyFile(t *testing.T, from, to string) {
	t.Helper()
	b, err := os.ReadFile(from)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(to, b, 0o644); err != nil {
		t.Fatal(err)
	}
}

var overallRE = regexp.MustCompile(`Overall exposure level for \S+: ([0-9]+\.[0-9]+) (\S+)`)

// exposure runs `systemd-analyze security --offline=true` on unit and
// returns the overall exposure level and its rating. threshold (0 for
// none) is passed as --threshold=, which systemd compares with ten times
// the printed level. Anything systemd-analyze prints on stderr (an unknown
// or misspelt setting, a bad value) fails the test: such a line means a
// setting was ignored, and its protection is missing.
func exposure(t *testing.T, unit string, threshold int) (float64, string, string, error) {
	t.Helper()
	args := []string{"security", "--offline=true", "--no-pager"}
	if threshold > 0 {
		args = append(args, "--threshold="+strconv.Itoa(threshold))
	}
	cmd := exec.Command(systemdAnalyze(t), append(args, unit)...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	runErr := cmd.Run()
	if s := strings.TrimSpace(stderr.String()); s != "" {
		t.Errorf("systemd-analyze security %s warned (a setting is ignored):\n%s", unit, s)
	}
	m := overallRE.FindStringSubmatch(stdout.String())
	if m == nil {
		t.Fatalf("systemd-analyze security %s: no overall exposure line (%v)\n%s%s", unit, runErr, stdout.String(), stderr.String())
	}
	v, err := strconv.ParseFloat(m[1], 64)
	if err != nil {
		t.Fatal(err)
	}
	return v, m[2], stdout.String(), runErr
}

// unexposed lists the checks systemd-analyze marks as not met (✗).
func unexposed(report string) []string {
	var out []string
	for _, l := range strings.Split(report, "\n") {
		if strings.HasPrefix(l, "✗ ") {
			out = append(out, strings.Join(strings.Fields(l)[1:2], ""))
		}
	}
	return out
}

// TestUnitExposure: the unit as shipped scores at most maxExposure in
// systemd's own security analysis (the unit before hardening scored 8.5,
// EXPOSED, and fails here).
func TestUnitExposure(t *testing.T) {
	unit := unitDir(t)
	v, rating, report, err := exposure(t, unit, int(maxExposure*10))
	t.Logf("systemd-analyze security --offline=true %s: overall exposure %.1f %s; not met: %s", unitName, v, rating, strings.Join(unexposed(report), " "))
	if v > maxExposure {
		var lines []string
		for _, l := range strings.Split(report, "\n") {
			if strings.HasPrefix(l, "✗ ") {
				lines = append(lines, l)
			}
		}
		t.Errorf("overall exposure of %s is %.1f %s, want at most %.1f; the settings that count against it:\n%s", unitName, v, rating, maxExposure, strings.Join(lines, "\n"))
	}
	// --threshold makes systemd-analyze itself exit non-zero above the
	// bound; it must agree with the parsed level.
	if err != nil && v <= maxExposure {
		t.Errorf("systemd-analyze security --threshold=%d failed although the level is %.1f: %v", int(maxExposure*10), v, err)
	}
	if err == nil && v > maxExposure {
		t.Errorf("systemd-analyze security --threshold=%d passed although the level is %.1f", int(maxExposure*10), v)
	}
}

// TestDropinExposure reports the exposure with each optional drop-in merged
// (and all the ones that go together), so docs/systemd.md's numbers can be
// checked. No bound: each drop-in gives up a protection on purpose.
func TestDropinExposure(t *testing.T) {
	entries, err := os.ReadDir(dropinDir)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range entries {
		if strings.HasSuffix(e.Name(), ".conf") {
			names = append(names, e.Name())
		}
	}
	for _, want := range []string{"tpm.conf", "pkcs11-module.conf", "local-only.conf", "socket-group.conf"} {
		if !contains(names, want) {
			t.Errorf("%s/%s is missing (docs/systemd.md describes it)", dropinDir, want)
		}
	}
	base, _, _, _ := exposure(t, unitDir(t), 0)
	sets := [][]string{}
	for _, n := range names {
		sets = append(sets, []string{n})
	}
	sets = append(sets, []string{"tpm.conf", "local-only.conf"})
	for _, set := range sets {
		v, rating, report, _ := exposure(t, unitDir(t, set...), 0)
		t.Logf("%s + %s: overall exposure %.1f %s (base %.1f); not met: %s", unitName, strings.Join(set, " + "), v, rating, base, strings.Join(unexposed(report), " "))
	}
}

// TestUnitVerify runs `systemd-analyze verify` on the unit alone and with
// each drop-in. verify insists that ExecStart's binary exists, so the copy
// points ExecStart at an empty executable; every other line is the
// shipped one. Any complaint about the unit fails the test.
func TestUnitVerify(t *testing.T) {
	analyze := systemdAnalyze(t)
	entries, err := os.ReadDir(dropinDir)
	if err != nil {
		t.Fatal(err)
	}
	sets := [][]string{nil}
	for _, e := range entries {
		sets = append(sets, []string{e.Name()})
	}
	for _, set := range sets {
		name := "unit"
		if set != nil {
			name = set[0]
		}
		t.Run(name, func(t *testing.T) {
			unit := unitDir(t, set...)
			stub := filepath.Join(filepath.Dir(unit), "kms-plugin")
			if err := os.WriteFile(stub, []byte("#!/bin/sh\n"), 0o755); err != nil {
				t.Fatal(err)
			}
			b, err := os.ReadFile(unit)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Contains(b, []byte("\nExecStart=/usr/local/bin/kms-plugin ")) {
				t.Fatalf("%s: no ExecStart=/usr/local/bin/kms-plugin line to point at a stub", unitName)
			}
			b = bytes.Replace(b, []byte("\nExecStart=/usr/local/bin/kms-plugin "), []byte("\nExecStart="+stub+" "), 1)
			if err := os.WriteFile(unit, b, 0o644); err != nil {
				t.Fatal(err)
			}
			out, err := exec.Command(analyze, "verify", "--man=no", unit).CombinedOutput()
			var about []string
			for _, l := range strings.Split(strings.TrimSpace(string(out)), "\n") {
				if strings.Contains(l, "kms-plugin") {
					about = append(about, l)
				} else if l != "" {
					t.Logf("systemd-analyze verify, not about this unit: %s", l)
				}
			}
			if err != nil || len(about) > 0 {
				t.Errorf("systemd-analyze verify %s (with %v): %v\n%s", unitName, set, err, strings.Join(about, "\n"))
			}
		})
	}
}

// unitSettings reads the [Service] (and other) sections of a unit file
// into section -> key -> values, in order.
func unitSettings(t *testing.T, path string) map[string]map[string][]string {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	out := map[string]map[string][]string{}
	section := ""
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		l := strings.TrimSpace(sc.Text())
		switch {
		case l == "" || strings.HasPrefix(l, "#") || strings.HasPrefix(l, ";"):
		case strings.HasPrefix(l, "[") && strings.HasSuffix(l, "]"):
			section = l[1 : len(l)-1]
			if out[section] == nil {
				out[section] = map[string][]string{}
			}
		default:
			k, v, ok := strings.Cut(l, "=")
			if !ok {
				t.Fatalf("%s: line %q is not KEY=VALUE", path, l)
			}
			out[section][k] = append(out[section][k], v)
		}
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	return out
}

// last is systemd's reading of a single-valued setting: the last one wins.
func last(vs []string) string {
	if len(vs) == 0 {
		return ""
	}
	return vs[len(vs)-1]
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}

// staticPod is the plugin's container in the static pod manifest.
func staticPod(t *testing.T) podrun.Pod {
	t.Helper()
	p, err := podrun.FromPodFile("kms-plugin-static-pod.yaml", "kms-plugin")
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// staticPodIDs returns the uid and gid the static pod runs the plugin as.
func staticPodIDs(t *testing.T) (uid, gid int64) {
	t.Helper()
	uid, gid, err := staticPod(t).RunAs()
	if err != nil {
		t.Fatalf("kms-plugin-static-pod.yaml: %v", err)
	}
	return uid, gid
}

// sysusers parses sysusers.d/kms-plugin.conf: user name -> uid and gid,
// group name -> gid.
func sysusers(t *testing.T) (users map[string][2]int64, groups map[string]int64) {
	t.Helper()
	users, groups = map[string][2]int64{}, map[string]int64{}
	for _, f := range confLines(t, "sysusers.d/kms-plugin.conf") {
		if len(f) < 3 {
			t.Fatalf("sysusers.d/kms-plugin.conf: short line %q", f)
		}
		switch f[0] {
		case "g":
			gid, err := strconv.ParseInt(f[2], 10, 64)
			if err != nil {
				t.Fatalf("sysusers.d: group %s: gid %q is not a number (a fixed gid is the point)", f[1], f[2])
			}
			groups[f[1]] = gid
		case "u":
			us, gs, ok := strings.Cut(f[2], ":")
			uid, err1 := strconv.ParseInt(us, 10, 64)
			gid, err2 := strconv.ParseInt(gs, 10, 64)
			if !ok || err1 != nil || err2 != nil {
				t.Fatalf("sysusers.d: user %s: id %q is not UID:GID in numbers (a fixed uid is the point)", f[1], f[2])
			}
			users[f[1]] = [2]int64{uid, gid}
		default:
			t.Fatalf("sysusers.d/kms-plugin.conf: unexpected line type %q", f[0])
		}
	}
	return users, groups
}

// confLines returns the fields of a sysusers.d or tmpfiles.d file's
// non-comment lines, honouring double quotes.
func confLines(t *testing.T, path string) [][]string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var out [][]string
	for _, l := range strings.Split(string(b), "\n") {
		l = strings.TrimSpace(l)
		if l == "" || strings.HasPrefix(l, "#") {
			continue
		}
		var fields []string
		for l != "" {
			if l[0] == '"' {
				end := strings.IndexByte(l[1:], '"')
				if end < 0 {
					t.Fatalf("%s: unterminated quote in %q", path, l)
				}
				fields = append(fields, l[1:end+1])
				l = strings.TrimSpace(l[end+2:])
				continue
			}
			f, rest, _ := strings.Cut(l, " ")
			fields = append(fields, f)
			l = strings.TrimSpace(rest)
		}
		out = append(out, fields)
	}
	return out
}

// pluginSocket returns the socket path of plugin-config.yaml.
func pluginSocket(t *testing.T) string {
	t.Helper()
	b, err := os.ReadFile("plugin-config.yaml")
	if err != nil {
		t.Fatal(err)
	}
	var c struct {
		Socket string `json:"socket"`
	}
	if err := yaml.Unmarshal(b, &c); err != nil {
		t.Fatalf("plugin-config.yaml: %v", err)
	}
	if c.Socket == "" {
		t.Fatal("plugin-config.yaml: no socket")
	}
	return c.Socket
}

// underRun maps /var/run/X to /run/X: /var/run links to /run on every
// systemd system, and systemd and tmpfiles name the folder under /run.
func underRun(p string) string {
	if rest, ok := strings.CutPrefix(p, "/var/run/"); ok {
		return "/run/" + rest
	}
	return p
}

// TestIdentitiesAgree: the unit's User=/Group=, the sysusers.d user and
// group, the tmpfiles.d owners and the static pod's runAsUser/runAsGroup
// all name one identity, uid and gid 65532; and the socket folder is the
// same in the plugin config, the unit, tmpfiles.d and the static pod.
func TestIdentitiesAgree(t *testing.T) {
	podUID, podGID := staticPodIDs(t)
	users, groups := sysusers(t)
	svc := unitSettings(t, unitName)["Service"]
	user, group := last(svc["User"]), last(svc["Group"])
	if user == "" || group == "" {
		t.Fatalf("%s: User= and Group= must be set (a static user; the plugin must not run as root)", unitName)
	}
	if last(svc["DynamicUser"]) == "yes" {
		t.Errorf("%s: DynamicUser=yes; the keyset is owned by a stable uid, use the sysusers.d user", unitName)
	}
	ids, ok := users[user]
	if !ok {
		t.Fatalf("sysusers.d/kms-plugin.conf does not define user %q (the unit's User=)", user)
	}
	if ids[0] != podUID || ids[1] != podGID {
		t.Errorf("sysusers.d: user %s is %d:%d, the static pod runs as %d:%d; the same files must work for both", user, ids[0], ids[1], podUID, podGID)
	}
	gid, ok := groups[group]
	if !ok {
		t.Fatalf("sysusers.d/kms-plugin.conf does not define group %q (the unit's Group=)", group)
	}
	if gid != podGID {
		t.Errorf("sysusers.d: group %s is %d, the static pod's runAsGroup is %d", group, gid, podGID)
	}

	// The socket folder.
	sock := pluginSocket(t)
	sockDir := underRun(filepath.Dir(sock))
	if got := "/run/" + last(svc["RuntimeDirectory"]); got != sockDir {
		t.Errorf("%s: RuntimeDirectory= gives %s, plugin-config.yaml's socket %s is in %s", unitName, got, sock, sockDir)
	}
	if m := last(svc["RuntimeDirectoryMode"]); m != "0750" {
		t.Errorf("%s: RuntimeDirectoryMode=%s, want 0750 (the plugin refuses a folder others can write)", unitName, m)
	}
	if got := last(svc["ExecStart"]); got != wantExecStart {
		t.Errorf("%s: ExecStart=%s, want %s (as the README documents)", unitName, got, wantExecStart)
	}
	enc, err := os.ReadFile("encryption-config.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Contains(enc, []byte("endpoint: unix://"+sock+"\n")) {
		t.Errorf("encryption-config.yaml: no endpoint unix://%s (plugin-config.yaml's socket)", sock)
	}
	if podSockDir := underRun(staticPod(t).HostPath("socket")); podSockDir != sockDir {
		t.Errorf("static pod's socket hostPath is %q, plugin-config.yaml's socket folder is %s", podSockDir, sockDir)
	}

	// tmpfiles.d: the socket folder owned by the plugin, the config folder
	// by root with the plugin's group, both 0750.
	want := map[string][4]string{
		sockDir:           {"d", "0750", user, group},
		"/etc/kms-plugin": {"d", "0750", "root", group},
	}
	seen := map[string]bool{}
	for _, f := range confLines(t, "tmpfiles.d/kms-plugin.conf") {
		if len(f) < 5 {
			t.Fatalf("tmpfiles.d/kms-plugin.conf: short line %q", f)
		}
		w, ok := want[f[1]]
		if !ok {
			t.Errorf("tmpfiles.d/kms-plugin.conf: unexpected path %s", f[1])
			continue
		}
		seen[f[1]] = true
		if got := [4]string{f[0], f[2], f[3], f[4]}; got != w {
			t.Errorf("tmpfiles.d: %s is type, mode, user, group %v, want %v", f[1], got, w)
		}
	}
	for p := range want {
		if !seen[p] {
			t.Errorf("tmpfiles.d/kms-plugin.conf does not create %s", p)
		}
	}
}

// TestSysusersTmpfilesApply applies the two files with systemd-sysusers and
// systemd-tmpfiles to an empty root folder, as a node's boot would, and
// checks the result: the user and group in its passwd and group files and
// the folders' owners and modes, against the static pod's ids.
func TestSysusersTmpfilesApply(t *testing.T) {
	sysusersBin, err1 := exec.LookPath("systemd-sysusers")
	tmpfilesBin, err2 := exec.LookPath("systemd-tmpfiles")
	if err1 != nil || err2 != nil {
		systemdAnalyze(t) // installs the systemd package when it can
		sysusersBin, err1 = exec.LookPath("systemd-sysusers")
		tmpfilesBin, err2 = exec.LookPath("systemd-tmpfiles")
		if err1 != nil || err2 != nil {
			t.Skip("systemd-sysusers or systemd-tmpfiles is not installed (the systemd package)")
		}
	}
	if os.Geteuid() != 0 {
		t.Skip("systemd-tmpfiles needs root to set the folders' owners")
	}
	podUID, podGID := staticPodIDs(t)
	root := t.TempDir()
	for _, d := range []string{"etc/sysusers.d", "etc/tmpfiles.d"} {
		if err := os.MkdirAll(filepath.Join(root, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	copyFile(t, "sysusers.d/kms-plugin.conf", filepath.Join(root, "etc/sysusers.d/kms-plugin.conf"))
	copyFile(t, "tmpfiles.d/kms-plugin.conf", filepath.Join(root, "etc/tmpfiles.d/kms-plugin.conf"))
	for _, c := range [][]string{{sysusersBin, "--root=" + root}, {tmpfilesBin, "--root=" + root, "--create"}} {
		if out, err := exec.Command(c[0], c[1:]...).CombinedOutput(); err != nil {
			t.Fatalf("%s: %v\n%s", strings.Join(c, " "), err, out)
		}
	}
	passwd, err := os.ReadFile(filepath.Join(root, "etc/passwd"))
	if err != nil {
		t.Fatal(err)
	}
	wantLine := fmt.Sprintf("kms-plugin:x:%d:%d:", podUID, podGID)
	if !strings.Contains(string(passwd), "\n"+wantLine) && !strings.HasPrefix(string(passwd), wantLine) {
		t.Errorf("passwd after systemd-sysusers has no %q line:\n%s", wantLine, passwd)
	}
	group, err := os.ReadFile(filepath.Join(root, "etc/group"))
	if err != nil {
		t.Fatal(err)
	}
	wantLine = fmt.Sprintf("kms-plugin:x:%d:", podGID)
	if !strings.Contains(string(group), "\n"+wantLine) && !strings.HasPrefix(string(group), wantLine) {
		t.Errorf("group after systemd-sysusers has no %q line:\n%s", wantLine, group)
	}
	for _, c := range []struct {
		path     string
		uid, gid int64
	}{
		{"run/kms-plugin", podUID, podGID},
		{"etc/kms-plugin", 0, podGID},
	} {
		fi, err := os.Stat(filepath.Join(root, c.path))
		if err != nil {
			t.Errorf("systemd-tmpfiles did not create /%s: %v", c.path, err)
			continue
		}
		st := fi.Sys().(*syscall.Stat_t)
		if !fi.IsDir() || fi.Mode().Perm() != 0o750 || int64(st.Uid) != c.uid || int64(st.Gid) != c.gid {
			t.Errorf("/%s is %v %d:%d, want a folder 0750 %d:%d", c.path, fi.Mode(), st.Uid, st.Gid, c.uid, c.gid)
		}
	}
}

// TestImagesPinned: every container image in the shipped Kubernetes
// manifests is a release tag pulled IfNotPresent or a digest, never a moving
// tag such as :latest, and both manifests run the same release (the
// kustomize base overrides one name for both).
func TestImagesPinned(t *testing.T) {
	var refs []string
	for _, f := range []string{"kms-plugin-static-pod.yaml", "rotation-cronjob.yaml"} {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		var obj struct {
			Spec struct {
				corev1.PodSpec `json:",inline"`
				JobTemplate    struct {
					Spec struct {
						Template corev1.PodTemplateSpec `json:"template"`
					} `json:"spec"`
				} `json:"jobTemplate"`
			} `json:"spec"`
		}
		if err := yaml.Unmarshal(b, &obj); err != nil {
			t.Fatalf("%s: %v", f, err)
		}
		containers := append(obj.Spec.Containers, obj.Spec.JobTemplate.Spec.Template.Spec.Containers...)
		if len(containers) == 0 {
			t.Fatalf("%s: no containers found", f)
		}
		for _, c := range containers {
			refs = append(refs, c.Image)
			if msg := imageProblem(c); msg != "" {
				t.Errorf("%s: container %s: %s", f, c.Name, msg)
			}
		}
	}
	for _, r := range refs[1:] {
		if r != refs[0] {
			t.Errorf("the manifests run different images: %v", refs)
		}
	}
}

// imageProblem says what is wrong with a container's image reference, or "".
func imageProblem(c corev1.Container) string {
	name, digest, hasDigest := strings.Cut(c.Image, "@")
	if hasDigest {
		if !strings.HasPrefix(digest, "sha256:") || len(digest) != len("sha256:")+64 {
			return "image " + c.Image + ": a digest must be sha256:<64 hex>"
		}
		return ""
	}
	i := strings.LastIndex(name, ":")
	if i < 0 || strings.Contains(name[i:], "/") {
		return "image " + c.Image + " has no tag: pin a release tag or a digest"
	}
	if tag := name[i+1:]; tag == "latest" || !strings.HasPrefix(tag, "v") {
		return "image " + c.Image + ": tag " + tag + " is not a release version (vX.Y.Z); pin a release or a digest"
	}
	if c.ImagePullPolicy != corev1.PullIfNotPresent {
		return "image " + c.Image + " by tag needs imagePullPolicy: IfNotPresent (got " + string(c.ImagePullPolicy) + ")"
	}
	return ""
}
