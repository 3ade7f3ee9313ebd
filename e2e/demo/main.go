// Command demo walks a newcomer through KMS v2 encryption at rest on a real
// control plane: it starts etcd, one kube-apiserver and kms-plugin with a
// fresh development keyset in a temp folder, writes a few Secrets, shows how
// they sit in etcd (provider prefix, key_id, no plaintext), promotes a new
// key with kmsctl, and shows new writes under the new key while old objects
// still read. It then keeps the control plane running for kubectl until
// Ctrl-C; with --once it exits after the walkthrough (for CI).
//
// It drives the same harness as the e2e tests (package e2e/harness), so the
// demo cannot drift from what the tests prove.
//
// Usage: go run ./e2e/demo [--once] [--keep]
package main

import (
	"bytes"
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/kms-v2/kms-plugin/e2e/harness"
	"github.com/kms-v2/kms-plugin/rotation/etcdlayout"
)

const namespace = "demo"

func main() {
	once := flag.Bool("once", false, "exit 0 after the walkthrough instead of serving until Ctrl-C")
	keep := flag.Bool("keep", false, "keep the temp folder (logs, configs, etcd data) after exit")
	flag.Parse()

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	err := run(ctx, *once, *keep)
	harness.RemoveBuiltBinaries()
	if err != nil && !errors.Is(err, context.Canceled) {
		fmt.Fprintf(os.Stderr, "\ndemo failed: %v\n", err)
		os.Exit(1)
	}
}

// out prints the walkthrough: plain text, indented under numbered steps.
type out struct{ step, steps int }

func (o *out) title(format string, args ...any) {
	o.step++
	fmt.Printf("\n[%d/%d] %s\n", o.step, o.steps, fmt.Sprintf(format, args...))
}

func (o *out) say(format string, args ...any) { fmt.Printf("      "+format+"\n", args...) }

func run(ctx context.Context, once, keep bool) error {
	o := &out{steps: 6}
	fmt.Println("kms-plugin demo: Kubernetes KMS v2 encryption at rest, on a real kube-apiserver and etcd")

	o.title("Finding or building the binaries")
	o.say("kube-apiserver and etcd are built from pinned Go modules (the first build takes minutes;")
	o.say("later runs reuse the cache); kms-plugin and kmsctl are built from this repository.")
	start := time.Now()
	if _, err := harness.ControlPlaneBinDir(); err != nil {
		return err
	}
	if _, err := harness.PluginBinDir(); err != nil {
		return err
	}
	o.say("ready in %s", since(start))

	o.title("Starting etcd, kms-plugin (fresh development keyset) and kube-apiserver")
	start = time.Now()
	c, err := harness.Launch(ctx, harness.Options{
		ProviderName: "demo-kms",
		KeepDir:      keep,
	})
	if err != nil {
		return err
	}
	defer func() {
		fmt.Println("\nStopping the control plane...")
		if err := c.Close(); err != nil {
			fmt.Fprintf(os.Stderr, "stop: %v\n", err)
		}
		if keep {
			fmt.Printf("Kept %s (logs under logs/).\n", c.Dir)
		}
	}()
	a, p := c.APIServers[0], c.Plugins[0]
	first, err := c.PrimaryKeyID()
	if err != nil {
		return err
	}
	o.say("up in %s", since(start))
	o.say("kube-apiserver   %s", a.URL)
	o.say("kms-plugin       unix://%s", p.Socket)
	o.say("keyset           %s", c.KeysetPath())
	o.say("primary key_id   %s   (public: it is stored next to every object)", first)
	o.say("The EncryptionConfiguration (%s) lists the plugin first, identity second:", a.EncryptionConfig)
	o.say("secrets and configmaps are encrypted on write; older plaintext objects still read.")

	o.title("Creating Secrets through the apiserver")
	if err := c.CreateNamespace(ctx, namespace); err != nil {
		return err
	}
	secrets := map[string]string{
		"db-password": "correct-horse-battery-staple",
		"api-token":   "tok_5up3r_s3cr3t",
		"tls-passkey": "hunter2-but-longer",
	}
	names := []string{"db-password", "api-token", "tls-passkey"}
	for _, name := range names {
		if err := createSecret(ctx, a, name, secrets[name]); err != nil {
			return err
		}
		o.say("secret %s/%s  value %q", namespace, name, secrets[name])
	}

	o.title("Looking at etcd directly, bypassing the apiserver")
	for _, name := range names {
		st, err := c.StoredObject(ctx, c.Layout.Key("secrets", namespace, name))
		if err != nil {
			return err
		}
		if err := show(o, st, secrets[name]); err != nil {
			return err
		}
	}
	ns, err := c.StoredObject(ctx, c.Layout.Key("namespaces", "", namespace))
	if err == nil {
		o.say("For contrast, namespaces are not encrypted: %s starts with %q", ns.Key, ns.Raw[:4])
	}

	o.title("Rotating the key encryption key with kmsctl")
	next, err := c.CreateKey()
	if err != nil {
		return err
	}
	o.say("$ kmsctl keys create --config %s", c.KmsctlConfig())
	o.say("%s   (created enabled, not primary: every plugin can decrypt with it first)", next)
	if err := c.Promote(next); err != nil {
		return err
	}
	o.say("$ kmsctl keys promote %s --config ...", next)
	o.say("The plugin reloads the keyset every second; the apiserver notices the new key_id on its")
	o.say("next Status call (every minute, or on /readyz once 20 s have passed). Waiting...")
	start = time.Now()
	if err := c.WaitForWriteKey(ctx, 0, next); err != nil {
		return err
	}
	o.say("kube-apiserver switched to %s after %s", next, since(start))

	o.title("New writes use the new key; old objects still read")
	secrets["after-rotation"] = "written-under-the-new-key"
	names = append(names, "after-rotation")
	if err := createSecret(ctx, a, "after-rotation", secrets["after-rotation"]); err != nil {
		return err
	}
	w := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintf(w, "      SECRET\tKEY_ID IN ETCD\tREAD THROUGH THE APISERVER\n")
	for _, name := range names {
		st, err := c.StoredObject(ctx, c.Layout.Key("secrets", namespace, name))
		if err != nil {
			return err
		}
		got, err := a.Client.CoreV1().Secrets(namespace).Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			return fmt.Errorf("read %s: %w", name, err)
		}
		v := string(got.Data["value"])
		if v != secrets[name] {
			return fmt.Errorf("secret %s reads back %q, want %q", name, v, secrets[name])
		}
		fmt.Fprintf(w, "      %s\t%s\t%q\n", name, st.Stored.KeyID, v)
	}
	w.Flush()
	o.say("Objects keep their old key_id until rewritten: `kmsctl rotate` re-encrypts them, and the")
	o.say("old key may be disabled only once etcd shows nothing uses it.")

	if once {
		fmt.Println("\nWalkthrough complete (--once).")
		return nil
	}
	fmt.Printf("\nThe control plane keeps running. Try:\n\n")
	fmt.Printf("  export KUBECONFIG=%s\n", a.Kubeconfig)
	fmt.Printf("  %s get secrets -n %s\n", c.KubectlPath(), namespace)
	fmt.Printf("  %s keys list --config %s\n", c.KmsctlPath(), c.KmsctlConfig())
	fmt.Printf("\n  plugin metrics:  curl %s/metrics\n", p.HealthURL)
	fmt.Printf("  logs:            %s/logs/\n", c.Dir)
	fmt.Printf("\nPress Ctrl-C to stop and clean up.\n")
	<-ctx.Done()
	return nil
}

func createSecret(ctx context.Context, a *harness.APIServer, name, value string) error {
	_, err := a.Client.CoreV1().Secrets(namespace).Create(ctx, &corev1.Secret{
		ObjectMeta: metav1.ObjectMeta{Name: name},
		Data:       map[string][]byte{"value": []byte(value)},
	}, metav1.CreateOptions{})
	if err != nil {
		return fmt.Errorf("create secret %s: %w", name, err)
	}
	return nil
}

// show prints one stored Secret: its prefix, key_id, and whether its value
// appears in the stored bytes. A plaintext hit is an error: the demo must
// not claim what is not so.
func show(o *out, st harness.StoredObject, value string) error {
	prefixLen := len(etcdlayout.KMSv2Prefix)
	if i := bytes.IndexByte(st.Raw[prefixLen:], ':'); i >= 0 {
		prefixLen += i + 1
	}
	o.say("%s", st.Key)
	o.say("  stored as   %s, %d bytes", st.Stored.Encoding, len(st.Raw))
	o.say("  starts with %q  (then a protobuf EncryptedObject)", st.Raw[:prefixLen])
	o.say("  key_id      %s", st.Stored.KeyID)
	if st.Stored.Encoding != etcdlayout.EncodingKMSv2 {
		return fmt.Errorf("%s is not KMS v2 encrypted", st.Key)
	}
	if bytes.Contains(st.Raw, []byte(value)) {
		return fmt.Errorf("%s: the value appears in plaintext in etcd", st.Key)
	}
	o.say("  plaintext   %q does not appear anywhere in the stored bytes", ellipsis(value))
	return nil
}

func ellipsis(s string) string {
	if len(s) > 12 {
		return s[:12] + "..."
	}
	return s
}

func since(t time.Time) string {
	return strings.TrimSuffix(time.Since(t).Round(100*time.Millisecond).String(), ".0s")
}
