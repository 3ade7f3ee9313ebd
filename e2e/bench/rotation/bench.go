package main

import (
	"context"
	"fmt"
	"log"
	"path/filepath"
	"strings"
	"time"

	"golang.org/x/sync/errgroup"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/kms-v2/kms-plugin/e2e/harness"
	"github.com/kms-v2/kms-plugin/rotation"
	"github.com/kms-v2/kms-plugin/rotation/etcdlayout"
)

// bench is one run: its control plane, the identities kmsctl and kubectl
// run as, the writers, and everything measured so far.
type bench struct {
	cfg   config
	c     *harness.Cluster
	saKC  string // kubeconfig of the rotation ServiceAccount
	procs controlPlaneProcs
	load  load
	// idle is the writers' latency with nothing else running, pooled per
	// condition over the rounds.
	idle      map[string]*window
	results   []*result
	neighbour []float64 // core share the busy neighbour used, per busy round
	reads     []*reads  // at cfg.secrets, then at cfg.scaleTo
	objects   int       // bench secrets stored now
}

func run(cfg config) error {
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Hour)
	defer cancel()
	defer harness.RemoveBuiltBinaries()
	log.Printf("starting etcd, kms-plugin, kube-apiserver and kube-controller-manager")
	c, err := harness.Launch(ctx, harness.Options{APIServers: 1, ControllerManager: cfg.methods[methodSVM], Logf: log.Printf})
	if err != nil {
		return err
	}
	defer c.Close()
	root, err := harness.RepoRoot()
	if err != nil {
		return err
	}
	b := &bench{cfg: cfg, c: c, saKC: c.RotationKubeconfig, idle: map[string]*window{}}
	for _, ns := range []string{"bench", "bench-writers"} {
		if err := c.CreateNamespace(ctx, ns); err != nil {
			return err
		}
	}
	if err := b.grow(ctx, cfg.secrets); err != nil {
		return err
	}
	if err := b.load.start(ctx, c, "bench-writers", cfg.writers, cfg.rate); err != nil {
		return err
	}
	time.Sleep(3 * time.Second)
	b.procs = controlPlane(c.Dir)
	if err := b.measure(ctx); err != nil {
		return err
	}
	cancel()
	return b.write(root)
}

// measure runs the rounds, the saturated round, and the reads and rotation
// at each size.
func (b *bench) measure(ctx context.Context) error {
	for round := 1; round <= b.cfg.rounds; round++ {
		for _, cond := range b.cfg.conditions {
			if err := b.round(ctx, round, cond); err != nil {
				return err
			}
		}
	}
	if b.cfg.saturated {
		if err := b.saturated(ctx); err != nil {
			return err
		}
	}
	if err := b.measureReads(ctx); err != nil {
		return err
	}
	if b.cfg.scaleTo <= b.cfg.secrets {
		return nil
	}
	if err := b.grow(ctx, b.cfg.scaleTo); err != nil {
		return err
	}
	if err := b.measureReads(ctx); err != nil {
		return err
	}
	b.idleWindow(0, conditionQuiet)
	_, err := b.kmsctl(ctx, methodScale, conditionQuiet, 0, b.saKC, b.cfg.kmsctlArgs[0])
	return err
}

func (b *bench) measureReads(ctx context.Context) error {
	r, err := measureReads(ctx, b.c, b.saKC, b.cfg.readReps)
	if err != nil {
		return err
	}
	b.reads = append(b.reads, r)
	return nil
}

// round runs every method once in one condition.
func (b *bench) round(ctx context.Context, round int, cond string) error {
	if cond == conditionBusy {
		n, err := startNeighbour(ctx)
		if err != nil {
			return err
		}
		defer func() { b.neighbour = append(b.neighbour, n.stop()) }()
	}
	b.idleWindow(round, cond)
	if b.cfg.methods[methodKmsctl] {
		extra := b.cfg.kmsctlArgs[(round-1)%len(b.cfg.kmsctlArgs)]
		if _, err := b.kmsctl(ctx, methodKmsctl, cond, round, b.saKC, extra); err != nil {
			return err
		}
	}
	if b.cfg.methods[methodSVM] {
		args := []string{"--rewrite-with", "storageversionmigration"}
		if _, err := b.kmsctl(ctx, methodSVM, cond, round, b.saKC, args); err != nil {
			return err
		}
	}
	if b.cfg.methods[methodKubectl] {
		return b.kubectl(ctx, cond, round)
	}
	return nil
}

// idleWindow measures the writers with nothing else running, into the
// condition's pool: one window is only ~1000 samples, so its p99 is a
// handful of them, and the load of the machine changes over a run.
func (b *bench) idleWindow(round int, cond string) {
	w := b.idle[cond]
	if w == nil {
		w = &window{name: "idle " + cond}
		b.idle[cond] = w
	}
	b.load.set(w)
	log.Printf("round %d %s: measuring idle writers for %s", round, cond, b.cfg.idle)
	time.Sleep(b.cfg.idle)
	b.load.set(nil)
}

// saturated is kmsctl with no pacing, as the cluster admin (exempt from
// priority and fairness) and no writers: as fast as this control plane
// rewrites.
func (b *bench) saturated(ctx context.Context) error {
	b.load.paused.Store(true)
	defer b.load.paused.Store(false)
	args := []string{"--concurrency", "64", "--initial-concurrency", "64", "--latency-tolerance", "1000"}
	_, err := b.kmsctl(ctx, methodSaturated, conditionQuiet, 0, b.c.APIServers[0].Kubeconfig, args)
	return err
}

// kmsctl promotes a new key (waiting until the apiserver uses it), then
// times the kmsctl run that finishes the rotation: rewrite and census.
func (b *bench) kmsctl(ctx context.Context, method, cond string, round int, kubeconfig string, extra []string) (*result, error) {
	if _, err := b.c.RotateKey(ctx); err != nil {
		return nil, err
	}
	w := &window{name: method}
	b.load.set(w)
	cpu := b.procs.cpu()
	res, err := runKmsctl(ctx, b.c, kubeconfig, extra, b.profilePath(method, cond, round))
	b.load.set(nil)
	if err != nil {
		return nil, fmt.Errorf("%s (%s, round %d): %w", method, cond, round, err)
	}
	res.cpu = cpu.since()
	res.cpu["kmsctl"] = processCPU(res.ps)
	res.method, res.cond, res.round, res.writers, res.objects = method, cond, round, w, b.objects
	switch method {
	case methodSaturated:
		res.name = "saturated: " + res.name + ", no writers"
	case methodScale:
		res.name = fmt.Sprintf("%s at %d secrets", res.name, b.objects)
	}
	b.results = append(b.results, res)
	log.Printf("%s %s round %d: %s, writers p99 %s, %s", method, cond, round, res.wall.Round(10*time.Millisecond), w.p(0.99), cpuLine(res.cpu))
	time.Sleep(2 * time.Second)
	return res, nil
}

func (b *bench) profilePath(method, cond string, round int) string {
	if b.cfg.profile == "" {
		return ""
	}
	return filepath.Join(b.cfg.profile, fmt.Sprintf("%s-%s-%d", method, cond, round))
}

// kubectl promotes a new key, runs the documented pipeline, and counts
// what it left under an old key.
func (b *bench) kubectl(ctx context.Context, cond string, round int) error {
	newKey, err := b.c.RotateKey(ctx)
	if err != nil {
		return err
	}
	w := &window{name: methodKubectl}
	b.load.set(w)
	cpu := b.procs.cpu()
	res, err := runKubectl(ctx, b.c)
	b.load.set(nil)
	if err != nil {
		return err
	}
	for k, v := range cpu.since() {
		res.cpu[k] = v
	}
	res.method, res.cond, res.round, res.writers, res.objects = methodKubectl, cond, round, w, b.objects
	cs, err := rotation.TakeCensus(ctx, rotation.Etcd{Store: b.c.Etcd.Store(), Layout: b.c.Layout},
		[]rotation.Resource{mustResource("secrets")},
		rotation.Writers{"secrets": etcdlayout.KMSv2Writer(b.c.ProviderName, newKey)}, rotation.CensusOptions{})
	if err != nil {
		return err
	}
	res.note = fmt.Sprintf("census afterwards: %d of %d secrets still under an old key", cs.Stale(), cs.Total())
	b.results = append(b.results, res)
	log.Printf("kubectl %s round %d: %s, writers p99 %s, %s", cond, round, res.wall.Round(10*time.Millisecond), w.p(0.99), cpuLine(res.cpu))
	time.Sleep(2 * time.Second)
	return nil
}

// grow creates bench secrets up to n.
func (b *bench) grow(ctx context.Context, n int) error {
	log.Printf("creating secrets %d to %d", b.objects, n)
	start := time.Now()
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(32)
	secrets := b.c.APIServers[0].Client.CoreV1().Secrets("bench")
	for i := b.objects; i < n; i++ {
		g.Go(func() error {
			_, err := secrets.Create(gctx, &corev1.Secret{
				ObjectMeta: metav1.ObjectMeta{Name: fmt.Sprintf("s-%06d", i)},
				Data:       map[string][]byte{"password": []byte(fmt.Sprintf("value-%d-%s", i, strings.Repeat("x", 64)))},
			}, metav1.CreateOptions{})
			return err
		})
	}
	if err := g.Wait(); err != nil {
		return err
	}
	log.Printf("created in %s", time.Since(start).Round(time.Millisecond))
	b.objects = n
	return nil
}

// write prints the report and puts it in docs/BENCHMARKS.md unless the run
// was partial.
func (b *bench) write(root string) error {
	md := b.report()
	fmt.Print(md)
	if b.cfg.out == "-" {
		return nil
	}
	out := b.cfg.out
	if out == "" {
		out = filepath.Join(root, "docs", "BENCHMARKS.md")
	}
	return putSection(out, "## Rotation", md)
}
