//go:build e2e

package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sync/errgroup"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/kms-v2/kms-plugin/e2e/harness"
	"github.com/kms-v2/kms-plugin/rotation"
	"github.com/kms-v2/kms-plugin/rotation/etcdlayout"
)

// kmsctlRun is one finished kmsctl process.
type kmsctlRun struct {
	stdout, stderr string
	code           int
	killed         bool // ended by SIGKILL
}

// rotateArgs are the flags every rotate in these tests needs: apiserver 0
// as the shipped rotation ServiceAccount (its RBAC, under its FlowSchema), etcd, and every apiserver so each is confirmed
// one by one. --keyset-distributed: the harness's plugins share one keyset
// file (per-node key state kept the same on every "node").
func rotateArgs(c *harness.Cluster, extra ...string) []string {
	return append(perNodeRotateArgs(c, "--keyset-distributed"), extra...)
}

// perNodeRotateArgs are rotateArgs without --keyset-distributed.
func perNodeRotateArgs(c *harness.Cluster, extra ...string) []string {
	var urls []string
	for _, a := range c.APIServers {
		urls = append(urls, a.URL)
	}
	args := append([]string{"rotate", "--config", c.KmsctlConfig(), "--kubeconfig", c.RotationKubeconfig}, c.EtcdFlags()...)
	args = append(args, "--apiservers", strings.Join(urls, ","), "--lease-duration", "4s", "-o", "json")
	return append(args, extra...)
}

// runKmsctl runs kmsctl and reports how it ended, including a SIGKILL.
func runKmsctl(ctx context.Context, t *testing.T, c *harness.Cluster, args ...string) kmsctlRun {
	t.Helper()
	cmd := exec.CommandContext(ctx, c.KmsctlPath(), args...)
	cmd.Env = append(os.Environ(), c.Env()...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	start := time.Now()
	err := cmd.Run()
	r := kmsctlRun{stdout: stdout.String(), stderr: stderr.String()}
	var ee *exec.ExitError
	switch {
	case err == nil:
	case errors.As(err, &ee):
		r.code = ee.ExitCode()
		if ws, ok := ee.Sys().(syscall.WaitStatus); ok && ws.Signaled() && ws.Signal() == syscall.SIGKILL {
			r.killed = true
		}
	default:
		t.Fatalf("kmsctl %s: %v", strings.Join(args, " "), err)
	}
	t.Logf("kmsctl %s: exit %d killed=%v in %s", args[0], r.code, r.killed, time.Since(start).Round(time.Millisecond))
	return r
}

// rotate runs kmsctl rotate and decodes its JSON report; it fails the test
// unless the exit code is wantCode.
func rotate(ctx context.Context, t *testing.T, c *harness.Cluster, wantCode int, extra ...string) *rotation.Report {
	t.Helper()
	r := runKmsctl(ctx, t, c, rotateArgs(c, extra...)...)
	if r.code != wantCode || r.killed {
		t.Fatalf("kmsctl rotate %v: exit %d (killed %v), want %d\nstderr:\n%s", extra, r.code, r.killed, wantCode, r.stderr)
	}
	return decodeReport(t, r.stdout)
}

// decodeReport parses `kmsctl rotate -o json`.
func decodeReport(t *testing.T, stdout string) *rotation.Report {
	t.Helper()
	var rep rotation.Report
	if err := json.Unmarshal([]byte(stdout), &rep); err != nil {
		t.Fatalf("rotate report: %v\n%s", err, stdout)
	}
	return &rep
}

// census counts from etcd, under the cluster's layout, how the given
// resources are stored, judged against what the apiserver writes when the
// plugin's primary is current: KMS v2 under the cluster's provider name.
func census(ctx context.Context, t *testing.T, c *harness.Cluster, current string, resources ...string) *rotation.Census {
	t.Helper()
	rs, err := rotation.ParseResources(resources)
	if err != nil {
		t.Fatal(err)
	}
	w := rotation.Writers{}
	for _, r := range rs {
		w[r.Name] = etcdlayout.KMSv2Writer(c.ProviderName, current)
	}
	cs, err := rotation.TakeCensus(ctx, rotation.Etcd{Store: c.Etcd.Store(), Layout: c.Layout}, rs, w, rotation.CensusOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return cs
}

// requireAllUnder fails unless every counted object is stored as the
// apiserver writes with keyID primary: KMS v2, the cluster's provider name,
// keyID.
func requireAllUnder(ctx context.Context, t *testing.T, c *harness.Cluster, keyID string, resources ...string) *rotation.Census {
	t.Helper()
	cs := census(ctx, t, c, keyID, resources...)
	for _, rc := range cs.Resources {
		if got, want := rc.Objects(c.ProviderName, keyID), rc.Total; got != want || rc.Stale != 0 {
			t.Errorf("%s: %d of %d objects under provider %s key %s (by provider %+v, plaintext %d, other %d, undecodable %d, stale %d), want all",
				rc.Resource, got, want, c.ProviderName, keyID, rc.ByProvider, rc.Plaintext, rc.Other, rc.Undecodable, rc.Stale)
		}
	}
	return cs
}

// keyState returns the state kmsctl reports for keyID.
func keyState(t *testing.T, c *harness.Cluster, keyID string) string {
	t.Helper()
	keys, err := c.Keys()
	if err != nil {
		t.Fatal(err)
	}
	for _, k := range keys {
		if k.KeyID == keyID {
			return k.State
		}
	}
	return ""
}

func mustPrimary(t *testing.T, c *harness.Cluster) string {
	t.Helper()
	id, err := c.PrimaryKeyID()
	if err != nil {
		t.Fatal(err)
	}
	return id
}

// populate creates n secrets and m configmaps in a new namespace through
// both apiservers in parallel, and returns the namespace.
func populate(ctx context.Context, t *testing.T, c *harness.Cluster, prefix string, secrets, configmaps int) string {
	t.Helper()
	ns := fmt.Sprintf("%s-%d", prefix, time.Now().UnixNano()%1e6)
	if err := c.CreateNamespace(ctx, ns); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(24)
	for i := range secrets + configmaps {
		a := c.APIServers[i%len(c.APIServers)]
		g.Go(func() error {
			if i < secrets {
				_, err := a.Client.CoreV1().Secrets(ns).Create(gctx, &corev1.Secret{
					ObjectMeta: metav1.ObjectMeta{Name: fmt.Sprintf("s-%05d", i)},
					Data:       map[string][]byte{"v": []byte(fmt.Sprintf("initial-%d", i))},
				}, metav1.CreateOptions{})
				return err
			}
			_, err := a.Client.CoreV1().ConfigMaps(ns).Create(gctx, &corev1.ConfigMap{
				ObjectMeta: metav1.ObjectMeta{Name: fmt.Sprintf("cm-%05d", i)},
				Data:       map[string]string{"v": fmt.Sprintf("initial-%d", i)},
			}, metav1.CreateOptions{})
			return err
		})
	}
	if err := g.Wait(); err != nil {
		t.Fatalf("populate %s: %v", ns, err)
	}
	t.Logf("created %d secrets and %d configmaps in %s in %s", secrets, configmaps, ns, time.Since(start).Round(time.Millisecond))
	return ns
}

// writers keep updating secrets while a rotation runs, the way workloads
// do, and remember every write the apiserver acknowledged.
type writers struct {
	mu    sync.Mutex
	acked map[string]string // secret name -> last acknowledged value
	// inFlight is a write cut off by the stop: it may or may not have
	// landed, so either value reads back correctly.
	inFlight  map[string]string
	conflicts int
	errs      []error
	writes    int
	cancel    context.CancelFunc
	wg        sync.WaitGroup
}

// startWriters runs n writers over the secrets s-00000..s-<count-1> of ns,
// alternating apiservers.
func startWriters(ctx context.Context, c *harness.Cluster, ns string, n, count int) *writers {
	ctx, cancel := context.WithCancel(ctx)
	w := &writers{acked: map[string]string{}, inFlight: map[string]string{}, cancel: cancel}
	for i := range n {
		w.wg.Add(1)
		go func() {
			defer w.wg.Done()
			a := c.APIServers[i%len(c.APIServers)]
			secrets := a.Client.CoreV1().Secrets(ns)
			for seq := 0; ctx.Err() == nil; seq++ {
				name := fmt.Sprintf("s-%05d", (seq*n+i)%count)
				cur, err := secrets.Get(ctx, name, metav1.GetOptions{})
				if err != nil {
					w.record(ctx, err, false)
					continue
				}
				val := fmt.Sprintf("w%d-%d", i, seq)
				cur.Data = map[string][]byte{"v": []byte(val)}
				_, err = secrets.Update(ctx, cur, metav1.UpdateOptions{})
				if err == nil {
					w.mu.Lock()
					w.acked[name] = val
					w.writes++
					w.mu.Unlock()
					continue
				}
				if ctx.Err() != nil {
					w.mu.Lock()
					w.inFlight[name] = val
					w.mu.Unlock()
					return
				}
				w.record(ctx, err, true)
			}
		}()
	}
	return w
}

func (w *writers) record(ctx context.Context, err error, update bool) {
	if ctx.Err() != nil {
		return
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	if update && isConflict(err) {
		w.conflicts++
		return
	}
	w.errs = append(w.errs, err)
}

func (w *writers) stop() {
	w.cancel()
	w.wg.Wait()
}

func isConflict(err error) bool { return apierrors.IsConflict(err) }

// freeAddr is a loopback address with a port nobody listens on right now.
func freeAddr(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}
