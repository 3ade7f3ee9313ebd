package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/spf13/cobra"
	"google.golang.org/protobuf/proto"
	kmstypes "k8s.io/apiserver/pkg/storage/value/encrypt/envelope/kmsv2/v2"

	"github.com/kms-v2/kms-plugin/providers/secretfile"
	"github.com/kms-v2/kms-plugin/rotation/etcdlayout"
	"github.com/kms-v2/kms-plugin/rotation/etcdlayout/snapshottest"
)

// execute runs cmd with args in process and returns its stdout and error.
func execute(t *testing.T, cmd *cobra.Command, args ...string) (string, error) {
	t.Helper()
	var out bytes.Buffer
	cmd.SetArgs(args)
	cmd.SetOut(&out)
	cmd.SetErr(&bytes.Buffer{})
	cmd.SilenceUsage, cmd.SilenceErrors = true, true
	err := cmd.Execute()
	return out.String(), err
}

// kmsValue is what kube-apiserver stores for an object under keyID through
// the provider named "kms".
func kmsValue(t *testing.T, keyID string) []byte {
	t.Helper()
	b, err := proto.Marshal(&kmstypes.EncryptedObject{KeyID: keyID, EncryptedDEKSource: []byte("dek"), EncryptedData: []byte("data")})
	if err != nil {
		t.Fatal(err)
	}
	return append([]byte(etcdlayout.KMSv2Prefix+"kms:"), b...)
}

// clusterSnapshot is a snapshot of an apiserver's etcd whose secrets are
// under keyID and whose one configmap is plaintext.
func clusterSnapshot(t *testing.T, keyID string) string {
	return snapshottest.Write(t,
		snapshottest.Put("/registry/namespaces/kube-system", []byte("k8s\x00ns")),
		snapshottest.Put("/registry/secrets/ns/a", kmsValue(t, keyID)),
		snapshottest.Put("/registry/secrets/ns/b", kmsValue(t, keyID)),
		snapshottest.Put("/registry/configmaps/ns/c", []byte("k8s\x00cm")),
	)
}

func TestCensusSnapshot(t *testing.T) {
	path := clusterSnapshot(t, "file:ks/7")
	out, err := execute(t, censusCommand(), "--snapshot", path, "--resources", "secrets,configmaps")
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"sha256 verified", "kms:v2 kms file:ks/7", "file:ks/7  2", "plaintext 2"} {
		if !strings.Contains(out, want) {
			t.Errorf("table lacks %q:\n%s", want, out)
		}
	}
	out, err = execute(t, censusCommand(), "--snapshot", path, "--resources", "secrets", "-o", "json")
	if err != nil {
		t.Fatal(err)
	}
	var got struct {
		Snapshot  string   `json:"snapshot"`
		KeyIDs    []string `json:"keyIDs"`
		Providers []string `json:"providers"`
		Resources []struct {
			Total int `json:"total"`
		} `json:"resources"`
	}
	if err := json.Unmarshal([]byte(out), &got); err != nil {
		t.Fatalf("%v:\n%s", err, out)
	}
	if got.Snapshot != path || strings.Join(got.KeyIDs, ",") != "file:ks/7" || strings.Join(got.Providers, ",") != "kms" || len(got.Resources) != 1 || got.Resources[0].Total != 2 {
		t.Errorf("json: got %+v", got)
	}
}

func TestCensusSnapshotRefuses(t *testing.T) {
	path := clusterSnapshot(t, "file:ks/7")
	noNamespace := snapshottest.Write(t, snapshottest.Put("/registry/secrets/ns/a", kmsValue(t, "file:ks/7")))
	tests := []struct {
		name string
		args []string
		want string
	}{
		{"live flags", []string{"--snapshot", path, "--etcd-endpoints", "http://127.0.0.1:2379"}, "drop --etcd-endpoints"},
		{"missing file", []string{"--snapshot", path + ".nope"}, "does not exist"},
		{"another prefix", []string{"--snapshot", path, "--etcd-prefix", "/other"}, "holds no key /other/namespaces/kube-system"},
		{"no kube-system namespace", []string{"--snapshot", noNamespace}, "holds no key /registry/namespaces/kube-system"},
		{"a resource with no object", []string{"--snapshot", path, "--resources", "secrets,configmaps,widgets.v1.example.com"}, "holds no widgets.v1.example.com under /registry"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			out, err := execute(t, censusCommand(), tt.args...)
			if err == nil || !strings.Contains(err.Error(), tt.want) || strings.Contains(err.Error(), "\n") {
				t.Errorf("err: got %v, want one line containing %q", err, tt.want)
			}
			if out != "" {
				t.Errorf("printed a census after refusing:\n%s", out)
			}
		})
	}
}

func TestKeysDisableKeepReadable(t *testing.T) {
	secretfile.SetRole(secretfile.Admin)
	dir := t.TempDir()
	config := filepath.Join(dir, "config.yaml")
	body := "socket: " + filepath.Join(dir, "kms.sock") + "\nprovider:\n  file:\n    path: keyset.json\n"
	if err := os.WriteFile(config, []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := execute(t, keysCommand(), "init", "--config", config); err != nil {
		t.Fatal(err)
	}
	newKey, err := execute(t, keysCommand(), "create", "--config", config)
	if err != nil {
		t.Fatal(err)
	}
	newKey = strings.TrimSpace(newKey)
	snap := clusterSnapshot(t, newKey)

	_, err = execute(t, keysCommand(), "disable", newKey, "--config", config, "--keep-readable", "other.db,"+snap)
	if err == nil || !strings.Contains(err.Error(), "other.db does not exist") {
		t.Fatalf("err: got %v, want the missing snapshot named", err)
	}
	_, err = execute(t, keysCommand(), "disable", newKey, "--config", config, "--keep-readable", snap)
	var ee *exitError
	if !errors.As(err, &ee) || ee.code != exitRetireRefused || !strings.Contains(err.Error(), "snapshot "+snap+" still needs key_id "+newKey) {
		t.Fatalf("err: got %v, want exit %d naming the snapshot and %s", err, exitRetireRefused, newKey)
	}
	list, err := execute(t, keysCommand(), "list", "--config", config, "-o", "json")
	if err != nil || !strings.Contains(strings.Join(strings.Fields(list), ""), `"keyID":"`+newKey+`","state":"enabled"`) {
		t.Fatalf("after a refused disable (%v):\n%s\nwant %s enabled", err, list, newKey)
	}
	if _, err := execute(t, keysCommand(), "disable", newKey, "--config", config); err != nil {
		t.Errorf("disable without --keep-readable: %v", err)
	}
}
