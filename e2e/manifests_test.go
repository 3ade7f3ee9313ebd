//go:build e2e

package e2e

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"sigs.k8s.io/yaml"

	"github.com/kms-v2/kms-plugin/e2e/harness"
)

// prometheusOperator is the module whose example/ folder holds the
// PrometheusRule and PodMonitor CRDs, so the dry-run below validates our
// objects against the real schemas. The Go module proxy serves it; its
// newer versions were not served when this was pinned.
const prometheusOperator = "github.com/prometheus-operator/prometheus-operator@v0.85.0"

// notAPIObjects are kinds in manifests/ that no API server serves: they are
// files for kube-apiserver, kubeadm and kustomize, checked by their own
// tests (the harness runs the EncryptionConfiguration, e2e/tools/kubeadmcheck
// the kubeadm patch, and the kustomize output is applied below).
var notAPIObjects = []string{"EncryptionConfiguration", "ClusterConfiguration", "InitConfiguration", "Kustomization"}

// requiredKinds must each appear among the objects applied, so a file that
// was moved or stopped parsing as an object fails here instead of being
// skipped.
var requiredKinds = []string{"Pod", "CronJob", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding", "PrometheusRule", "PodMonitor", "FlowSchema", "PriorityLevelConfiguration"}

// TestManifestsApply applies every Kubernetes object in manifests/ with a
// server-side dry-run to the real kube-apiserver (dryRun=All: admission,
// defaulting, validation and CRD schemas run, nothing is stored), then the
// kustomize base, plain and with an image override. The control plane is
// configured from manifests/encryption-config.yaml and
// manifests/plugin-config.yaml (the harness reads both).
func TestManifestsApply(t *testing.T) {
	c := harness.Start(t, harness.Options{})
	ctx := t.Context()
	k := kubectlFor(c)
	installMonitoringCRDs(ctx, t, k)
	// The controller-manager (not run here) creates each namespace's
	// default ServiceAccount; the static pod's dry-run admission needs it.
	if out, err := k.run(ctx, nil, "-n", "kube-system", "create", "serviceaccount", "default"); err != nil && !strings.Contains(out, "AlreadyExists") {
		t.Fatalf("create kube-system/default: %v\n%s", err, out)
	}

	root, err := harness.RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	kinds := map[string]int{}
	for _, file := range manifestFiles(t, filepath.Join(root, "manifests")) {
		objs := apiObjects(t, file)
		if len(objs) == 0 {
			continue
		}
		rel, _ := filepath.Rel(root, file)
		if out, err := k.run(ctx, nil, "apply", "--server-side", "--dry-run=server", "--field-manager=kms-e2e", "-f", file); err != nil {
			t.Errorf("%s: server-side dry-run refused: %v\n%s", rel, err, out)
			continue
		}
		for _, o := range objs {
			kinds[o.Kind]++
		}
		t.Logf("%s: %d objects accepted", rel, len(objs))
	}
	for _, kind := range requiredKinds {
		if kinds[kind] == 0 {
			t.Errorf("no %s among the objects in manifests/ (applied: %v)", kind, kinds)
		}
	}

	t.Run("Kustomize", func(t *testing.T) { testKustomize(ctx, t, k, filepath.Join(root, "manifests")) })
	t.Run("RotationCronJob", func(t *testing.T) { testRotationCronJob(ctx, t, c, root) })
	t.Run("ReadmeClusterSteps", func(t *testing.T) { testReadmeClusterSteps(ctx, t, c, k, root) })
}

// testKustomize renders the kustomize base and applies it (dry-run), then
// renders an overlay that pins the image by digest, as the README tells
// users to, and checks every container took the override.
func testKustomize(ctx context.Context, t *testing.T, k kubectl, base string) {
	out, err := k.run(ctx, nil, "kustomize", base)
	if err != nil {
		t.Fatalf("kubectl kustomize manifests/: %v\n%s", err, out)
	}
	if out, err := k.run(ctx, []byte(out), "apply", "--server-side", "--dry-run=server", "--field-manager=kms-e2e", "-f", "-"); err != nil {
		t.Fatalf("kustomize base: server-side dry-run refused: %v\n%s", err, out)
	}
	const digest = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
	overlay := t.TempDir()
	rel, err := filepath.Rel(overlay, base) // kustomize refuses absolute bases
	if err != nil {
		t.Fatal(err)
	}
	kust := "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources: [" + rel + "]\n" +
		"images:\n  - name: ghcr.io/kms-v2/kms-plugin\n    newName: registry.example/kms-plugin\n    digest: " + digest + "\n"
	if err := os.WriteFile(filepath.Join(overlay, "kustomization.yaml"), []byte(kust), 0o600); err != nil {
		t.Fatal(err)
	}
	out, err = k.run(ctx, nil, "kustomize", overlay)
	if err != nil {
		t.Fatalf("kubectl kustomize (overlay): %v\n%s", err, out)
	}
	images := 0
	for _, o := range decodeAll(t, "overlay", []byte(out)) {
		for _, img := range containerImages(t, o) {
			images++
			if img != "registry.example/kms-plugin@"+digest {
				t.Errorf("%s %s: image %s did not take the kustomize override", o.Kind, o.Name, img)
			}
		}
	}
	if images == 0 {
		t.Error("the kustomize base has no container image to override")
	}
}

type kubectl struct{ bin, kubeconfig string }

func kubectlFor(c *harness.Cluster) kubectl {
	return kubectl{bin: c.KubectlPath(), kubeconfig: c.APIServers[0].Kubeconfig}
}

// run runs kubectl with a deadline, stdin if given, and returns its
// combined output.
func (k kubectl) run(ctx context.Context, stdin []byte, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, k.bin, append([]string{"--kubeconfig", k.kubeconfig}, args...)...)
	if stdin != nil {
		cmd.Stdin = bytes.NewReader(stdin)
	}
	out, err := cmd.CombinedOutput()
	return string(out), err
}

// installMonitoringCRDs installs the prometheus-operator CRDs our
// PrometheusRule and PodMonitor need (for real, not dry-run: the dry-runs
// of those objects need the types served) and waits until they are.
func installMonitoringCRDs(ctx context.Context, t *testing.T, k kubectl) {
	t.Helper()
	dlCtx, cancel := context.WithTimeout(ctx, 3*time.Minute)
	defer cancel()
	out, err := exec.CommandContext(dlCtx, "go", "mod", "download", "-json", prometheusOperator).Output()
	if err != nil {
		t.Fatalf("go mod download %s (the CRDs for PrometheusRule and PodMonitor): %v\n%s", prometheusOperator, err, out)
	}
	var mod struct{ Dir string }
	if err := json.Unmarshal(out, &mod); err != nil || mod.Dir == "" {
		t.Fatalf("go mod download %s: no Dir in %s", prometheusOperator, out)
	}
	for _, name := range []string{"prometheusrules", "podmonitors"} {
		crd := filepath.Join(mod.Dir, "example/prometheus-operator-crd/monitoring.coreos.com_"+name+".yaml")
		if out, err := k.run(ctx, nil, "apply", "--server-side", "-f", crd); err != nil {
			t.Fatalf("install CRD %s: %v\n%s", name, err, out)
		}
		if out, err := k.run(ctx, nil, "wait", "--for=condition=Established", "--timeout=60s", "crd/"+name+".monitoring.coreos.com"); err != nil {
			t.Fatalf("CRD %s not established: %v\n%s", name, err, out)
		}
	}
}

// manifestFiles lists the YAML files under dir.
func manifestFiles(t *testing.T, dir string) []string {
	t.Helper()
	var files []string
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err == nil && !d.IsDir() && (strings.HasSuffix(p, ".yaml") || strings.HasSuffix(p, ".yml")) {
			files = append(files, p)
		}
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	return files
}

// object is the part of a manifest document the test reads.
type object struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata"`
	raw               []byte
}

// apiObjects returns file's documents that are Kubernetes API objects:
// those with apiVersion and kind, other than notAPIObjects. A document with
// only one of the two is an error (a broken manifest, not a config file).
func apiObjects(t *testing.T, file string) []object {
	t.Helper()
	b, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	var objs []object
	for _, o := range decodeAll(t, file, b) {
		if (o.APIVersion == "") != (o.Kind == "") {
			t.Errorf("%s: a document has apiVersion %q and kind %q; both or neither", file, o.APIVersion, o.Kind)
			continue
		}
		if o.Kind != "" && !slices.Contains(notAPIObjects, o.Kind) {
			objs = append(objs, o)
		}
	}
	return objs
}

func decodeAll(t *testing.T, name string, b []byte) []object {
	t.Helper()
	var objs []object
	r := utilyaml.NewYAMLReader(bufio.NewReader(bytes.NewReader(b)))
	for {
		doc, err := r.Read()
		if err != nil {
			break
		}
		if len(bytes.TrimSpace(doc)) == 0 {
			continue
		}
		var o object
		if err := yaml.Unmarshal(doc, &o); err != nil {
			// Config files (promtool tests, plugin configs) need not be
			// objects; a map that is not one has no kind and is skipped.
			continue
		}
		o.raw = doc
		objs = append(objs, o)
	}
	return objs
}

// containerImages returns the images of a Pod, or of a CronJob's pods.
func containerImages(t *testing.T, o object) []string {
	t.Helper()
	var spec *corev1.PodSpec
	switch o.Kind {
	case "Pod":
		var p corev1.Pod
		if err := yaml.Unmarshal(o.raw, &p); err != nil {
			t.Fatal(err)
		}
		spec = &p.Spec
	case "CronJob":
		var cj struct {
			Spec struct {
				JobTemplate struct {
					Spec struct {
						Template corev1.PodTemplateSpec `json:"template"`
					} `json:"spec"`
				} `json:"jobTemplate"`
			} `json:"spec"`
		}
		if err := yaml.Unmarshal(o.raw, &cj); err != nil {
			t.Fatal(err)
		}
		spec = &cj.Spec.JobTemplate.Spec.Template.Spec
	default:
		return nil
	}
	var images []string
	for _, c := range append(spec.InitContainers, spec.Containers...) {
		images = append(images, c.Image)
	}
	return images
}
