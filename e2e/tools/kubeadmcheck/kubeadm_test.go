package kubeadmcheck

import (
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	kubeadmscheme "k8s.io/kubernetes/cmd/kubeadm/app/apis/kubeadm/scheme"
	"k8s.io/kubernetes/cmd/kubeadm/app/phases/controlplane"
	configutil "k8s.io/kubernetes/cmd/kubeadm/app/util/config"
	"k8s.io/kubernetes/cmd/kubeadm/app/util/config/strict"
	"sigs.k8s.io/yaml"
)

const patchPath = "../../../manifests/kubeadm/cluster-configuration.yaml"

// initConfiguration is what the test adds to the shipped patch so kubeadm
// needs neither a container runtime nor a default route to default the
// node's own fields; the patch itself is all ClusterConfiguration.
const initConfiguration = `apiVersion: kubeadm.k8s.io/v1beta4
kind: InitConfiguration
localAPIEndpoint: {advertiseAddress: 192.0.2.10, bindPort: 6443}
nodeRegistration: {name: node-1, criSocket: unix:///run/containerd/containerd.sock}
`

func readManifest(t *testing.T, name string) []byte {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("../../../manifests", name))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// TestPatchIsStrictV1beta4: no field kubeadm's v1beta4 ClusterConfiguration
// does not know (a misspelt extraVolumes key would be dropped silently by
// kubeadm's lenient decoding).
func TestPatchIsStrictV1beta4(t *testing.T) {
	b := readManifest(t, "kubeadm/cluster-configuration.yaml")
	gvk := schema.GroupVersionKind{Group: "kubeadm.k8s.io", Version: "v1beta4", Kind: "ClusterConfiguration"}
	if err := strict.VerifyUnmarshalStrict([]*runtime.Scheme{kubeadmscheme.Scheme}, gvk, b); err != nil {
		t.Fatalf("manifests/kubeadm/cluster-configuration.yaml: %v", err)
	}
}

// TestRenderedAPIServer defaults and validates the patch as `kubeadm init
// --config` does, renders the kube-apiserver static pod from it and checks
// that pod against the shipped EncryptionConfiguration and plugin config:
// the flag names the file's path, the file's folder and the plugin's
// socket folder are mounted, and the socket is the one the plugin binds.
func TestRenderedAPIServer(t *testing.T) {
	patch := readManifest(t, "kubeadm/cluster-configuration.yaml")
	cfg, err := configutil.BytesToInitConfiguration([]byte(initConfiguration+"---\n"+string(patch)), true)
	if err != nil {
		t.Fatalf("kubeadm rejects manifests/kubeadm/cluster-configuration.yaml: %v", err)
	}
	pods := controlplane.GetStaticPodSpecs(&cfg.ClusterConfiguration, &cfg.LocalAPIEndpoint, nil)
	pod, ok := pods["kube-apiserver"]
	if !ok {
		t.Fatal("kubeadm rendered no kube-apiserver pod")
	}
	c := pod.Spec.Containers[0]
	const encPath = "/etc/kubernetes/enc/encryption-config.yaml"
	for _, want := range []string{"--encryption-provider-config=" + encPath, "--encryption-provider-config-automatic-reload=true"} {
		if !slices.Contains(c.Command, want) {
			t.Errorf("rendered kube-apiserver command has no %s:\n%s", want, strings.Join(c.Command, "\n"))
		}
	}
	if !mounted(pod, c, filepath.Dir(encPath)) {
		t.Errorf("rendered kube-apiserver does not mount %s from the host", filepath.Dir(encPath))
	}
	socket := pluginSocket(t)
	if !mounted(pod, c, filepath.Dir(socket)) {
		t.Errorf("rendered kube-apiserver does not mount the plugin's socket folder %s", filepath.Dir(socket))
	}
	if enc := readManifest(t, "encryption-config.yaml"); !strings.Contains(string(enc), "endpoint: unix://"+socket+"\n") {
		t.Errorf("manifests/encryption-config.yaml does not dial unix://%s, the socket in manifests/plugin-config.yaml", socket)
	}
}

// mounted reports whether container c mounts host folder dir at the same
// path through a hostPath volume of pod.
func mounted(pod corev1.Pod, c corev1.Container, dir string) bool {
	for _, m := range c.VolumeMounts {
		for _, v := range pod.Spec.Volumes {
			if v.Name == m.Name && v.HostPath != nil && v.HostPath.Path == dir && m.MountPath == dir {
				return true
			}
		}
	}
	return false
}

func pluginSocket(t *testing.T) string {
	t.Helper()
	var c struct {
		Socket string `json:"socket"`
	}
	if err := yaml.Unmarshal(readManifest(t, "plugin-config.yaml"), &c); err != nil || c.Socket == "" {
		t.Fatalf("manifests/plugin-config.yaml: no socket (%v)", err)
	}
	return c.Socket
}
