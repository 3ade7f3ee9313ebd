// Command rotation benchmarks re-encrypting every secret after a key
// promotion on a real control plane (etcd + kube-apiserver + kms-plugin from
// package harness): `kmsctl rotate` against the documented
// `kubectl get secrets -A -o json | kubectl replace -f -`, in one run, each
// after its own promote. It measures wall time, peak RSS of kmsctl and of
// each kubectl, and the p99 latency of paced concurrent writers while idle
// and during each method, then writes the numbers under "## Rotation" in
// docs/BENCHMARKS.md (other sections are kept).
//
// It is a program rather than a timed test because it runs for minutes and
// its output is a report, not a pass/fail.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"log"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"sort"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sync/errgroup"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/kms-v2/kms-plugin/e2e/harness"
	"github.com/kms-v2/kms-plugin/rotation"
	"github.com/kms-v2/kms-plugin/rotation/etcdlayout"
)

func main() {
	secrets := flag.Int("secrets", 10000, "secrets to re-encrypt")
	writers := flag.Int("writers", 4, "concurrent writers updating other secrets")
	rate := flag.Float64("writer-rate", 25, "writes per second per writer (paced, open loop)")
	idle := flag.Duration("idle", 10*time.Second, "how long to measure writers with nothing else running, before each round")
	rounds := flag.Int("rounds", 2, "rounds of both methods; the report gives each round and the medians")
	methods := flag.String("methods", "kmsctl,kubectl", "methods to run each round (kubectl can be left out for tuning runs)")
	kmsctlArgs := flag.String("kmsctl-args", "", "extra flags (or NAME=value environment) for kmsctl rotate, space separated; variants separated by ';' take turns by round (tuning runs)")
	profile := flag.String("profile", "", "folder for CPU profiles of kube-apiserver and kmsctl during each kmsctl run")
	out := flag.String("out", "", "markdown file to put the Rotation section in (default docs/BENCHMARKS.md of the repository; - for stdout only)")
	flag.Parse()
	log.SetFlags(log.Ltime)
	cfg := config{secrets: *secrets, writers: *writers, rate: *rate, idle: *idle, rounds: max(1, *rounds),
		profile: *profile, out: *out}
	for _, m := range strings.Split(*methods, ",") {
		switch strings.TrimSpace(m) {
		case "kmsctl":
			cfg.kmsctl = true
		case "kubectl":
			cfg.kubectl = true
		default:
			log.Fatalf("-methods: unknown method %q", m)
		}
	}
	for _, v := range strings.Split(*kmsctlArgs, ";") {
		cfg.kmsctlArgs = append(cfg.kmsctlArgs, strings.Fields(v))
	}
	if cfg.out == "" && (!(cfg.kmsctl && cfg.kubectl) || len(cfg.kmsctlArgs) > 1) {
		cfg.out = "-" // a partial run does not replace the documented numbers
	}
	if err := run(cfg); err != nil {
		log.Fatal(err)
	}
}

// config is what the flags ask for.
type config struct {
	secrets, writers int
	rate             float64
	idle             time.Duration
	rounds           int
	kmsctl, kubectl  bool
	kmsctlArgs       [][]string // variants, by round
	profile          string
	out              string
}

// window is one measured period of the writers.
type window struct {
	name      string
	latencies []time.Duration
	errors    int
}

func (w *window) p(q float64) time.Duration {
	if len(w.latencies) == 0 {
		return 0
	}
	s := append([]time.Duration(nil), w.latencies...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	return s[min(len(s)-1, int(q*float64(len(s))))]
}

// load is the writers: each updates its own secret at a fixed pace, and
// every latency lands in the current window.
type load struct {
	mu  sync.Mutex
	cur *window
}

func (l *load) set(w *window) {
	l.mu.Lock()
	l.cur = w
	l.mu.Unlock()
}

func (l *load) record(d time.Duration, err error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.cur == nil {
		return
	}
	if err != nil {
		l.cur.errors++
		return
	}
	l.cur.latencies = append(l.cur.latencies, d)
}

func (l *load) start(ctx context.Context, c *harness.Cluster, ns string, n int, rate float64) error {
	a := c.APIServers[0]
	for i := range n {
		if _, err := a.Client.CoreV1().Secrets(ns).Create(ctx, &corev1.Secret{
			ObjectMeta: metav1.ObjectMeta{Name: fmt.Sprintf("writer-%d", i)},
			Data:       map[string][]byte{"v": []byte("0")},
		}, metav1.CreateOptions{}); err != nil {
			return err
		}
	}
	interval := time.Duration(float64(time.Second) / rate)
	for i := range n {
		go func() {
			secrets := a.Client.CoreV1().Secrets(ns)
			t := time.NewTicker(interval)
			defer t.Stop()
			for seq := 0; ; seq++ {
				select {
				case <-ctx.Done():
					return
				case <-t.C:
				}
				// A blind update (no resourceVersion) never conflicts, so the
				// latency is the apiserver's, not a retry loop's.
				start := time.Now()
				_, err := secrets.Update(ctx, &corev1.Secret{
					ObjectMeta: metav1.ObjectMeta{Name: fmt.Sprintf("writer-%d", i), Namespace: ns},
					Data:       map[string][]byte{"v": []byte(fmt.Sprint(seq))},
				}, metav1.UpdateOptions{})
				if ctx.Err() == nil {
					l.record(time.Since(start), err)
				}
			}
		}()
	}
	return nil
}

// result is one method's measurement.
type result struct {
	name    string
	wall    time.Duration
	rssKiB  []int64 // peak RSS per process
	anonKiB []int64 // peak anonymous RSS per process
	writers *window
	note    string
	report  *rotation.Report
	ps      *os.ProcessState
	round   int
	// cpu is the CPU time each control-plane process and the method's own
	// processes used while it ran: on two shared cores it shows where the
	// capacity went.
	cpu map[string]time.Duration
}

func run(cfg config) error {
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Minute)
	defer cancel()
	defer harness.RemoveBuiltBinaries()
	log.Printf("starting etcd, kms-plugin and kube-apiserver")
	c, err := harness.Launch(ctx, harness.Options{APIServers: 1, Logf: log.Printf})
	if err != nil {
		return err
	}
	defer c.Close()

	if err := c.CreateNamespace(ctx, "bench"); err != nil {
		return err
	}
	if err := c.CreateNamespace(ctx, "bench-writers"); err != nil {
		return err
	}
	log.Printf("creating %d secrets", cfg.secrets)
	start := time.Now()
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(32)
	for i := range cfg.secrets {
		g.Go(func() error {
			_, err := c.APIServers[0].Client.CoreV1().Secrets("bench").Create(gctx, &corev1.Secret{
				ObjectMeta: metav1.ObjectMeta{Name: fmt.Sprintf("s-%05d", i)},
				Data:       map[string][]byte{"password": []byte(fmt.Sprintf("value-%d-%s", i, strings.Repeat("x", 64)))},
			}, metav1.CreateOptions{})
			return err
		})
	}
	if err := g.Wait(); err != nil {
		return err
	}
	log.Printf("created in %s", time.Since(start).Round(time.Millisecond))

	var l load
	if err := l.start(ctx, c, "bench-writers", cfg.writers, cfg.rate); err != nil {
		return err
	}
	time.Sleep(3 * time.Second)
	procs := controlPlane(c.Dir)
	idleW := &window{name: "idle"}
	var kres, cres []*result
	for round := 1; round <= cfg.rounds; round++ {
		// Idle before every round, pooled: one window is only ~1000
		// samples, so its p99 is a handful of them, and the load of the
		// machine changes over a run.
		l.set(idleW)
		log.Printf("round %d/%d: measuring idle writers for %s", round, cfg.rounds, cfg.idle)
		time.Sleep(cfg.idle)
		l.set(nil)
		if cfg.kmsctl {
			// Promote a new key (waiting until the apiserver uses it), then
			// time the run that finishes the rotation: rewrite and census.
			if _, err := c.RotateKey(ctx); err != nil {
				return err
			}
			w := &window{name: "kmsctl"}
			l.set(w)
			cpu := procs.cpu()
			res, err := runKmsctl(ctx, c, cfg, round)
			l.set(nil)
			if err != nil {
				return err
			}
			res.cpu = cpu.since()
			res.cpu["kmsctl"] = processCPU(res.ps)
			res.round = round
			res.writers = w
			kres = append(kres, res)
			log.Printf("%s: %s, writers p99 %s, %s", res.name, res.wall.Round(10*time.Millisecond), w.p(0.99), cpuLine(res.cpu))
			time.Sleep(2 * time.Second)
		}
		if cfg.kubectl {
			// Its own promote, then the documented pipeline.
			newKey, err := c.RotateKey(ctx)
			if err != nil {
				return err
			}
			w := &window{name: "kubectl"}
			l.set(w)
			cpu := procs.cpu()
			res, err := runKubectl(ctx, c)
			l.set(nil)
			if err != nil {
				return err
			}
			for k, v := range cpu.since() {
				res.cpu[k] = v
			}
			res.writers, res.round = w, round
			cs, err := rotation.TakeCensus(ctx, rotation.Etcd{Store: c.Etcd.Store(), Layout: c.Layout},
				[]rotation.Resource{mustResource("secrets")},
				rotation.Writers{"secrets": etcdlayout.KMSv2Writer(c.ProviderName, newKey)}, rotation.CensusOptions{})
			if err != nil {
				return err
			}
			res.note = fmt.Sprintf("census afterwards: %d of %d secrets still under an old key", cs.Stale(), cs.Total())
			cres = append(cres, res)
			log.Printf("kubectl: %s, writers p99 %s, %s", res.wall.Round(10*time.Millisecond), w.p(0.99), cpuLine(res.cpu))
			time.Sleep(2 * time.Second)
		}
	}
	cancel()

	md := report(cfg, idleW, kres, cres)
	fmt.Print(md)
	if cfg.out == "-" {
		return nil
	}
	out := cfg.out
	if out == "" {
		root, err := harness.RepoRoot()
		if err != nil {
			return err
		}
		out = filepath.Join(root, "docs", "BENCHMARKS.md")
	}
	return putSection(out, "## Rotation", md)
}

func mustResource(name string) rotation.Resource {
	r, err := rotation.ParseResource(name)
	if err != nil {
		panic(err)
	}
	return r
}

// runKmsctl times `kmsctl rotate` finishing the rotation to the promoted key.
func runKmsctl(ctx context.Context, c *harness.Cluster, cfg config, round int) (*result, error) {
	args := []string{"rotate", "--config", c.KmsctlConfig(),
		"--kubeconfig", c.APIServers[0].Kubeconfig, "--etcd-endpoints", c.Etcd.Endpoint,
		"--apiservers", c.APIServers[0].URL, "--resources", "secrets", "-o", "json"}
	if cfg.profile != "" {
		if err := os.MkdirAll(cfg.profile, 0o755); err != nil {
			return nil, err
		}
		args = append(args, "--cpu-profile", filepath.Join(cfg.profile, fmt.Sprintf("kmsctl-%d.pprof", round)))
	}
	extra := cfg.kmsctlArgs[(round-1)%len(cfg.kmsctlArgs)]
	var env []string
	for _, a := range extra {
		// NAME=value (an upper-case name) is kmsctl's environment, e.g.
		// GOMEMLIMIT=16MiB, so only kmsctl sees it, not the control plane.
		if name, _, ok := strings.Cut(a, "="); ok && name == strings.ToUpper(name) && !strings.HasPrefix(name, "-") {
			env = append(env, a)
		} else {
			args = append(args, a)
		}
	}
	cmd := exec.CommandContext(ctx, c.KmsctlPath(), args...)
	cmd.Env = append(os.Environ(), env...)
	var stdout strings.Builder
	cmd.Stdout, cmd.Stderr = &stdout, os.Stderr
	log.Printf("kmsctl rotate")
	start := time.Now()
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	anon := sampleAnon(cmd.Process.Pid)
	if cfg.profile != "" {
		go profileAPIServer(ctx, c, filepath.Join(cfg.profile, fmt.Sprintf("kube-apiserver-%d.pprof", round)))
	}
	err := cmd.Wait()
	wall := time.Since(start)
	anonPeak := anon.peak()
	if err != nil {
		return nil, fmt.Errorf("kmsctl rotate: %w", err)
	}
	var rep rotation.Report
	if err := json.Unmarshal([]byte(stdout.String()), &rep); err != nil {
		return nil, err
	}
	st := rep.Rewrite["secrets"]
	note := fmt.Sprintf("action %s, %d passes, remaining %d", rep.Action, rep.Passes, rep.Remaining)
	if st != nil {
		note += fmt.Sprintf(", %d rewritten, %d unchanged, %d conflicts, %d errors", st.Rewritten, st.Unchanged, st.Conflicts, st.Errors)
	}
	name := "kmsctl rotate"
	if len(extra) > 0 {
		name += " " + strings.Join(extra, " ")
	}
	return &result{name: name, wall: wall, rssKiB: []int64{maxRSS(cmd.ProcessState)}, anonKiB: []int64{anonPeak}, note: note, report: &rep, ps: cmd.ProcessState}, nil
}

// profileAPIServer saves a CPU profile of kube-apiserver over the first
// seconds of a kmsctl run (its /debug/pprof, admin token).
func profileAPIServer(ctx context.Context, c *harness.Cluster, path string) {
	code, body, err := c.APIServers[0].Get(ctx, "/debug/pprof/profile?seconds=5")
	if err != nil || code != 200 {
		log.Printf("kube-apiserver profile: %d %v", code, err)
		return
	}
	if err := os.WriteFile(path, []byte(body), 0o644); err != nil {
		log.Printf("kube-apiserver profile: %v", err)
	}
}

// runKubectl times `kubectl get secrets -A -o json | kubectl replace -f -`,
// with both processes started here so each one's peak RSS is known.
func runKubectl(ctx context.Context, c *harness.Cluster) (*result, error) {
	kc := c.APIServers[0].Kubeconfig
	get := exec.CommandContext(ctx, c.KubectlPath(), "--kubeconfig", kc, "get", "secrets", "-A", "-o", "json")
	replace := exec.CommandContext(ctx, c.KubectlPath(), "--kubeconfig", kc, "replace", "-f", "-")
	pr, pw, err := os.Pipe()
	if err != nil {
		return nil, err
	}
	get.Stdout, get.Stderr = pw, os.Stderr
	replace.Stdin, replace.Stdout = pr, io.Discard
	var stderr strings.Builder
	replace.Stderr = &stderr
	log.Printf("kubectl get secrets -A -o json | kubectl replace -f -")
	start := time.Now()
	if err := replace.Start(); err != nil {
		return nil, err
	}
	if err := get.Start(); err != nil {
		return nil, err
	}
	anonReplace, anonGet := sampleAnon(replace.Process.Pid), sampleAnon(get.Process.Pid)
	pw.Close()
	pr.Close()
	gerr := get.Wait()
	getPeak := anonGet.peak()
	rerr := replace.Wait()
	wall := time.Since(start)
	replacePeak := anonReplace.peak()
	note := "exit ok"
	if gerr != nil || rerr != nil {
		msg := strings.TrimSpace(stderr.String())
		if len(msg) > 300 {
			msg = msg[:300] + "..."
		}
		note = fmt.Sprintf("get: %v, replace: %v (%s)", gerr, rerr, msg)
	}
	cpu := map[string]time.Duration{"kubectl": processCPU(get.ProcessState) + processCPU(replace.ProcessState)}
	return &result{name: "kubectl get | kubectl replace", wall: wall, cpu: cpu,
		rssKiB: []int64{maxRSS(get.ProcessState), maxRSS(replace.ProcessState)}, anonKiB: []int64{getPeak, replacePeak}, note: note}, nil
}

// anonSampler follows a running process's anonymous (private) resident
// memory, which is what grows with work; maxrss also counts the pages of the
// mapped executable.
type anonSampler struct {
	stop chan struct{}
	done chan int64
}

func sampleAnon(pid int) *anonSampler {
	s := &anonSampler{stop: make(chan struct{}), done: make(chan int64, 1)}
	go func() {
		var peak int64
		t := time.NewTicker(20 * time.Millisecond)
		defer t.Stop()
		for {
			if b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid)); err == nil {
				for _, line := range strings.Split(string(b), "\n") {
					if v, ok := strings.CutPrefix(line, "RssAnon:"); ok {
						var kib int64
						fmt.Sscanf(strings.TrimSpace(v), "%d", &kib)
						peak = max(peak, kib)
					}
				}
			}
			select {
			case <-s.stop:
				s.done <- peak
				return
			case <-t.C:
			}
		}
	}()
	return s
}

func (s *anonSampler) peak() int64 {
	close(s.stop)
	return <-s.done
}

// maxRSS is the process's peak resident set in KiB (Linux reports KiB).
func maxRSS(ps *os.ProcessState) int64 {
	if ps == nil {
		return 0
	}
	if ru, ok := ps.SysUsage().(*syscall.Rusage); ok {
		return int64(ru.Maxrss)
	}
	return 0
}

func mib(kib int64) string { return fmt.Sprintf("%.1f MiB", float64(kib)/1024) }

// controlPlaneProcs are the harness's long-running processes (etcd,
// kube-apiserver, kms-plugin), found by their arguments naming the
// cluster's folder.
type controlPlaneProcs map[string]int

func controlPlane(dir string) controlPlaneProcs {
	out := controlPlaneProcs{}
	entries, _ := os.ReadDir("/proc")
	for _, e := range entries {
		var pid int
		if _, err := fmt.Sscanf(e.Name(), "%d", &pid); err != nil || pid == os.Getpid() {
			continue
		}
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
		if err != nil || !strings.Contains(string(b), dir) {
			continue
		}
		args := strings.Split(string(b), "\x00")
		out[filepath.Base(args[0])] = pid
	}
	return out
}

// cpuSnapshot is the CPU time of each control-plane process at one moment.
type cpuSnapshot struct {
	procs controlPlaneProcs
	at    map[string]time.Duration
}

func (p controlPlaneProcs) cpu() cpuSnapshot {
	s := cpuSnapshot{procs: p, at: map[string]time.Duration{}}
	for name, pid := range p {
		s.at[name] = procCPU(pid)
	}
	return s
}

// since returns the CPU time each process used after the snapshot.
func (s cpuSnapshot) since() map[string]time.Duration {
	out := map[string]time.Duration{}
	for name, pid := range s.procs {
		out[name] = procCPU(pid) - s.at[name]
	}
	return out
}

// procCPU reads utime+stime of a running process from /proc/<pid>/stat.
func procCPU(pid int) time.Duration {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0
	}
	// Fields after the command name, which is in parentheses and may
	// contain spaces: state is field 3, utime 14, stime 15.
	f := strings.Fields(string(b[strings.LastIndexByte(string(b), ')')+1:]))
	if len(f) < 13 {
		return 0
	}
	var ut, st int64
	fmt.Sscanf(f[11], "%d", &ut)
	fmt.Sscanf(f[12], "%d", &st)
	return time.Duration(ut+st) * time.Second / 100 // USER_HZ is 100 on Linux
}

// processCPU is the user+system time of an exited process.
func processCPU(ps *os.ProcessState) time.Duration {
	if ps == nil {
		return 0
	}
	return ps.UserTime() + ps.SystemTime()
}

func cpuLine(m map[string]time.Duration) string {
	var names []string
	for k := range m {
		names = append(names, k)
	}
	sort.Strings(names)
	var parts []string
	for _, k := range names {
		parts = append(parts, fmt.Sprintf("%s %.1fs", k, m[k].Seconds()))
	}
	return "CPU " + strings.Join(parts, ", ")
}

// median of xs (the lower middle one for an even count): a round to show
// the details of, the one that is not the slower of the middle two.
func median[T any](xs []T, less func(a, b T) bool) T {
	s := append([]T(nil), xs...)
	sort.Slice(s, func(i, j int) bool { return less(s[i], s[j]) })
	return s[(len(s)-1)/2]
}

// medianOf is the median of the values of xs (the mean of the middle two for
// an even count, so two rounds give their mean rather than the better one).
func medianOf[T any](xs []T, val func(T) float64) float64 {
	v := make([]float64, len(xs))
	for i, x := range xs {
		v[i] = val(x)
	}
	sort.Float64s(v)
	n := len(v)
	if n%2 == 1 {
		return v[n/2]
	}
	return (v[n/2-1] + v[n/2]) / 2
}

func report(cfg config, idle *window, ks, cs []*result) string {
	var b strings.Builder
	fmt.Fprintf(&b, "## Rotation\n\n")
	fmt.Fprintf(&b, "`make bench-rotation` (program `e2e/bench/rotation`), %s, on %d CPUs (%s/%s): etcd v3.7.0 + one kube-apiserver v1.37.2 + kms-plugin (file keyset) on loopback, %d secrets in one namespace, %d rounds. ",
		time.Now().UTC().Format("2006-01-02"), runtime.NumCPU(), runtime.GOOS, runtime.GOARCH, cfg.secrets, cfg.rounds)
	fmt.Fprintf(&b, "Each round measures idle writers for %s, then runs each method right after its own promote (new key created, promoted, the apiserver confirmed on it); each re-encrypts every secret. ", cfg.idle)
	fmt.Fprintf(&b, "Meanwhile %d writers update their own secrets at %.0f writes/s each (paced, open loop); their latency is measured while idle (pooled over the rounds) and during each method.", cfg.writers, cfg.rate)
	fmt.Fprintf(&b, "\n\n")
	rss := func(vals []int64) string {
		var parts []string
		var sum int64
		for _, v := range vals {
			parts = append(parts, mib(v))
			sum += v
		}
		if len(parts) == 1 {
			return parts[0]
		}
		return strings.Join(parts, " + ") + " = " + mib(sum)
	}
	idleP99 := max(idle.p(0.99), 1)
	ratio := func(r *result) float64 { return float64(r.writers.p(0.99)) / float64(idleP99) }
	fmt.Fprintf(&b, "| | round | wall time | objects/s | peak RSS | peak anonymous RSS | writers p50 | writers p99 | p99 / idle | writer errors | CPU during it |\n|---|---|---|---|---|---|---|---|---|---|---|\n")
	fmt.Fprintf(&b, "| idle | all | | | | | %s | %s | | %d | |\n", idle.p(0.5).Round(100*time.Microsecond), idle.p(0.99).Round(100*time.Microsecond), idle.errors)
	for _, rs := range [][]*result{ks, cs} {
		for _, r := range rs {
			fmt.Fprintf(&b, "| %s | %d | %s | %.0f | %s | %s | %s | %s | %.2fx | %d | %s |\n", strings.ReplaceAll(r.name, "|", "\\|"), r.round, r.wall.Round(10*time.Millisecond),
				float64(cfg.secrets)/r.wall.Seconds(), rss(r.rssKiB), rss(r.anonKiB), r.writers.p(0.5).Round(100*time.Microsecond), r.writers.p(0.99).Round(100*time.Microsecond),
				ratio(r), r.writers.errors, strings.TrimPrefix(cpuLine(r.cpu), "CPU "))
		}
	}
	byWall := func(a, b *result) bool { return a.wall < b.wall }
	byRatio := func(a, b *result) bool { return ratio(a) < ratio(b) }
	byRSS := func(a, b *result) bool { return a.rssKiB[0] < b.rssKiB[0] }
	if len(ks) > 0 && len(cs) > 0 {
		kw := medianOf(ks, func(r *result) float64 { return r.wall.Seconds() })
		cw := medianOf(cs, func(r *result) float64 { return r.wall.Seconds() })
		speedup := cw / kw
		kr := medianOf(ks, ratio)
		krss := int64(medianOf(ks, func(r *result) float64 { return float64(r.rssKiB[0]) }))
		worstRSS := slicesMax(ks, byRSS).rssKiB[0]
		fmt.Fprintf(&b, "\nGoals (medians over the rounds; with two rounds, their mean): kmsctl >= 4x faster than kubectl: **%.1fx** (%s, %.2fs vs %.2fs); writers' p99 during kmsctl <= 2x idle: **%.2fx** (%s; worst round %.2fx); kmsctl peak RSS <= 64 MiB: **%s** (%s; highest round %s).\n\n",
			speedup, verdict(speedup >= 4), kw, cw, kr, verdict(kr <= 2), ratio(slicesMax(ks, byRatio)), mib(krss), verdict(krss <= 64*1024), mib(worstRSS))
	}
	if len(ks) > 0 {
		k := median(ks, byWall)
		if k.report != nil {
			var phases []string
			for _, p := range k.report.Phases {
				phases = append(phases, p.Phase+" "+p.Duration.String())
			}
			fmt.Fprintf(&b, "- kmsctl phases (round %d): %s.\n", k.round, strings.Join(phases, ", "))
		}
		fmt.Fprintf(&b, "- kmsctl: %s. kmsctl's time includes its census before and after (read from etcd) and the apiserver confirmation; the kubectl pipeline proves nothing afterwards.\n", k.note)
		var total time.Duration
		for _, d := range k.cpu {
			total += d
		}
		if total > 0 && k.report != nil {
			// The bound that decides the speed goal on a small machine: every
			// patch costs the apiserver (and etcd, and kmsctl) CPU, and all of
			// them share the same cores with the writers.
			perObj := total / time.Duration(cfg.secrets)
			busy := total.Seconds() / (k.wall.Seconds() * float64(runtime.NumCPU()))
			fmt.Fprintf(&b, "- CPU (round %d): during kmsctl's run the control plane and kmsctl used %.1fs of CPU (%s; the writers' updates included), %s per secret rewritten, keeping %.0f%% of the %d cores busy. At that cost even 100%% of the cores would need %s for the %d secrets; 4x kubectl's median is %s.\n",
				k.round, total.Seconds(), strings.TrimPrefix(cpuLine(k.cpu), "CPU "), perObj.Round(10*time.Microsecond), 100*busy, runtime.NumCPU(),
				(perObj * time.Duration(cfg.secrets) / time.Duration(runtime.NumCPU())).Round(10*time.Millisecond), cfg.secrets, kubectlQuarter(cs))
		}
		fmt.Fprintf(&b, "- Peak RSS is the kernel's maxrss, which counts the pages of kmsctl's own executable it touched (file-backed, shared); the anonymous column, sampled every 20 ms from /proc, is the memory the work itself uses.\n")
	}
	if len(cs) > 0 {
		c := median(cs, byWall)
		fmt.Fprintf(&b, "- kubectl (round %d): %s; it holds every secret (with its data) in memory twice and a conflicting write makes it fail.\n", c.round, c.note)
	}
	return b.String()
}

// kubectlQuarter is a quarter of kubectl's median wall time: what kmsctl
// must reach for the 4x goal.
func kubectlQuarter(cs []*result) string {
	if len(cs) == 0 {
		return "unknown (kubectl not run)"
	}
	q := medianOf(cs, func(r *result) float64 { return r.wall.Seconds() }) / 4
	return (time.Duration(q * float64(time.Second))).Round(10 * time.Millisecond).String()
}

func slicesMax[T any](xs []T, less func(a, b T) bool) T {
	m := xs[0]
	for _, x := range xs[1:] {
		if less(m, x) {
			m = x
		}
	}
	return m
}

func verdict(ok bool) string {
	if ok {
		return "met"
	}
	return "NOT met"
}

// putSection replaces the section that starts with heading (up to the next
// "## " heading) in path, or appends it; other sections stay as they are.
func putSection(path, heading, body string) error {
	old, err := os.ReadFile(path)
	if err != nil && !os.IsNotExist(err) {
		return err
	}
	text := string(old)
	if text == "" {
		text = "# Benchmarks\n\n"
	}
	if i := strings.Index(text, heading+"\n"); i >= 0 {
		rest := text[i+len(heading)+1:]
		end := len(text)
		if j := strings.Index(rest, "\n## "); j >= 0 {
			end = i + len(heading) + 1 + j + 1
		}
		text = text[:i] + body + "\n" + text[end:]
	} else {
		if !strings.HasSuffix(text, "\n\n") {
			text = strings.TrimRight(text, "\n") + "\n\n"
		}
		text += body
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return err
	}
	log.Printf("wrote the Rotation section to %s", path)
	return os.WriteFile(path, []byte(strings.TrimRight(text, "\n")+"\n"), 0o644)
}
