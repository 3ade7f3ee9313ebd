package harness

import (
	"bufio"
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
)

// Environment variables that steer where binaries come from.
const (
	// EnvControlPlaneBin names a folder holding kube-apiserver and etcd
	// (and kubectl, etcdctl); when unset, e2e/tools/build.sh provides one.
	EnvControlPlaneBin = "KMS_E2E_BIN"
	// EnvPluginBinDir names a folder holding prebuilt kms-plugin and kmsctl
	// binaries; when unset they are built from this repository.
	EnvPluginBinDir = "KMS_PLUGIN_BIN_DIR"
)

// modulePath identifies this repository's root go.mod.
const modulePath = "github.com/kms-v2/kms-plugin"

// RepoRoot returns the folder of this repository's go.mod, found by walking up
// from the working directory (tests run in their package folder; the demo
// usually in the root). The e2e/tools module is skipped on the way.
func RepoRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		data, err := os.ReadFile(filepath.Join(dir, "go.mod"))
		if err == nil && isModule(data, modulePath) {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", fmt.Errorf("no go.mod of module %s above the working directory; run from inside the repository", modulePath)
		}
		dir = parent
	}
}

func isModule(gomod []byte, path string) bool {
	s := bufio.NewScanner(bytes.NewReader(gomod))
	for s.Scan() {
		f := strings.Fields(s.Text())
		if len(f) == 2 && f[0] == "module" {
			return f[1] == path
		}
	}
	return false
}

var controlPlane struct {
	once sync.Once
	dir  string
	err  error
}

// ControlPlaneBinDir returns the folder holding kube-apiserver and etcd,
// building them on first use in this process (minutes on a cold Go cache,
// seconds when warm).
func ControlPlaneBinDir() (string, error) {
	controlPlane.once.Do(func() {
		controlPlane.dir, controlPlane.err = findControlPlane()
	})
	return controlPlane.dir, controlPlane.err
}

func findControlPlane() (string, error) {
	dir := os.Getenv(EnvControlPlaneBin)
	if dir == "" {
		root, err := RepoRoot()
		if err != nil {
			return "", err
		}
		cmd := exec.Command("bash", filepath.Join(root, "e2e", "tools", "build.sh"))
		cmd.Dir = filepath.Join(root, "e2e", "tools")
		cmd.Stderr = os.Stderr // progress of a cold build is worth seeing
		out, err := cmd.Output()
		if err != nil {
			return "", fmt.Errorf("e2e/tools/build.sh: %w", err)
		}
		lines := strings.Split(strings.TrimSpace(string(out)), "\n")
		dir = strings.TrimSpace(lines[len(lines)-1])
	}
	for _, name := range []string{"kube-apiserver", "etcd"} {
		if _, err := os.Stat(filepath.Join(dir, name)); err != nil {
			return "", fmt.Errorf("control-plane binary %s: %w (set %s or run e2e/tools/build.sh)", name, err, EnvControlPlaneBin)
		}
	}
	return dir, nil
}

var pluginBin struct {
	once  sync.Once
	dir   string
	built bool
	err   error
}

// PluginBinDir returns the folder holding kms-plugin and kmsctl, building
// both from this repository on first use in this process, with the
// e2ehooks build tag (kmsctl's test-only crash hooks; prebuilt binaries in
// $KMS_PLUGIN_BIN_DIR need it too for the crash tests). When the calling
// binary is built with -race, so is the plugin: real apiserver traffic is the
// best race detector input the plugin gets.
func PluginBinDir() (string, error) {
	pluginBin.once.Do(func() {
		if dir := os.Getenv(EnvPluginBinDir); dir != "" {
			pluginBin.dir = dir
			for _, name := range []string{"kms-plugin", "kmsctl"} {
				if _, err := os.Stat(filepath.Join(dir, name)); err != nil {
					pluginBin.err = fmt.Errorf("%s: %w", EnvPluginBinDir, err)
				}
			}
			return
		}
		pluginBin.dir, pluginBin.err = buildPlugin()
		pluginBin.built = pluginBin.err == nil
	})
	return pluginBin.dir, pluginBin.err
}

func buildPlugin() (string, error) {
	root, err := RepoRoot()
	if err != nil {
		return "", err
	}
	dir, err := os.MkdirTemp("", "kms-plugin-bin")
	if err != nil {
		return "", err
	}
	// e2ehooks: kmsctl's crash hooks (--crash-after) exist only in such a
	// build; the shipped binary has none.
	args := []string{"build", "-tags", "e2ehooks", "-o", dir}
	if raceEnabled {
		args = append(args, "-race")
	}
	args = append(args, "./cmd/kms-plugin", "./cmd/kmsctl")
	cmd := exec.Command("go", args...)
	cmd.Dir = root
	out, err := cmd.CombinedOutput()
	if err != nil {
		os.RemoveAll(dir)
		return "", fmt.Errorf("go %s: %w\n%s", strings.Join(args, " "), err, out)
	}
	return dir, nil
}

// RemoveBuiltBinaries deletes the kms-plugin and kmsctl this process built,
// if any. Call it once no cluster runs any more.
func RemoveBuiltBinaries() {
	if pluginBin.built {
		os.RemoveAll(pluginBin.dir)
	}
}

// RunTests runs m and then removes the binaries built for it; use it as
// `func TestMain(m *testing.M) { os.Exit(harness.RunTests(m)) }`.
func RunTests(m *testing.M) int {
	code := m.Run()
	RemoveBuiltBinaries()
	return code
}
