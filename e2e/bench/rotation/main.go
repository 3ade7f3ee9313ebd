// Command rotation benchmarks finishing a key rotation on a real control
// plane (etcd + kube-apiserver + kms-plugin, and kube-controller-manager for
// StorageVersionMigration, from package harness), every method right after
// its own promote, in one run:
//
//   - `kmsctl rotate` (the default engine), run as the shipped rotation
//     ServiceAccount under the shipped FlowSchema, not as system:masters;
//   - `kmsctl rotate --rewrite-with storageversionmigration`, the platform's
//     engine, run the same way;
//   - the documented `kubectl get secrets -A -o json | kubectl replace -f -`,
//     as the cluster admin;
//
// on a quiet machine and on a busy one (a neighbour process keeps one core
// loaded), while paced writers update other secrets and their latency is
// measured. A separate saturated round (no writers, no pacing) gives the
// control plane's own rewrite rate. It compares `kmsctl census` with a raw
// paginated etcd range read of the same prefix, and with -scale-to repeats
// the census and the rotation at a larger size to measure memory growth and
// per-object time. The report, with a verdict per goal of issue 13, goes
// under "## Rotation" in docs/BENCHMARKS.md (other sections are kept).
//
// It is a program rather than a timed test because it runs for many minutes
// and its output is a report, not a pass/fail.
package main

import (
	"flag"
	"log"
	"strings"
	"time"

	"github.com/kms-v2/kms-plugin/rotation"
)

// Methods and conditions, by the names the flags and the report use.
const (
	methodKmsctl    = "kmsctl"
	methodSVM       = "svm"
	methodKubectl   = "kubectl"
	conditionQuiet  = "quiet"
	conditionBusy   = "busy"
	methodSaturated = "saturated"
	methodScale     = "scale"
)

func main() {
	secrets := flag.Int("secrets", 10000, "secrets to re-encrypt")
	scaleTo := flag.Int("scale-to", 0, "after the rounds, grow to this many secrets and measure census and kmsctl rotate again (memory growth, per-object time); 0 skips it")
	writers := flag.Int("writers", 4, "concurrent writers updating other secrets")
	rate := flag.Float64("writer-rate", 25, "writes per second per writer (paced, open loop)")
	idle := flag.Duration("idle", 10*time.Second, "how long to measure writers with nothing else running, before each round")
	rounds := flag.Int("rounds", 2, "rounds of every method in every condition; the report gives each round and the medians")
	methods := flag.String("methods", "kmsctl,svm,kubectl", "methods to run each round: kmsctl, svm (--rewrite-with storageversionmigration), kubectl")
	conditions := flag.String("conditions", "quiet,busy", "machine conditions of each round: quiet, busy (a neighbour process loads one core)")
	saturated := flag.Bool("saturated", true, "run the saturated round: kmsctl without pacing or writers, the control plane's own rewrite rate")
	readReps := flag.Int("reads", 3, "repetitions of census against the raw etcd read, at each size")
	kmsctlArgs := flag.String("kmsctl-args", "", "extra flags (or NAME=value environment) for the default kmsctl rotate, space separated; variants separated by ';' take turns by round (tuning runs)")
	profile := flag.String("profile", "", "folder for CPU profiles of kube-apiserver and kmsctl during each kmsctl run")
	out := flag.String("out", "", "markdown file to put the Rotation section in (default docs/BENCHMARKS.md of the repository; - for stdout only)")
	flag.Parse()
	log.SetFlags(log.Ltime)
	cfg := config{secrets: *secrets, scaleTo: *scaleTo, writers: *writers, rate: *rate, idle: *idle, rounds: max(1, *rounds),
		saturated: *saturated, readReps: max(1, *readReps), profile: *profile, out: *out, methods: map[string]bool{}}
	for _, m := range strings.Split(*methods, ",") {
		switch m = strings.TrimSpace(m); m {
		case methodKmsctl, methodSVM, methodKubectl:
			cfg.methods[m] = true
		default:
			log.Fatalf("-methods: unknown method %q; use kmsctl, svm or kubectl", m)
		}
	}
	for _, c := range strings.Split(*conditions, ",") {
		switch c = strings.TrimSpace(c); c {
		case conditionQuiet, conditionBusy:
			cfg.conditions = append(cfg.conditions, c)
		default:
			log.Fatalf("-conditions: unknown condition %q; use quiet or busy", c)
		}
	}
	for _, v := range strings.Split(*kmsctlArgs, ";") {
		cfg.kmsctlArgs = append(cfg.kmsctlArgs, strings.Fields(v))
	}
	if cfg.out == "" && !cfg.complete() {
		cfg.out = "-" // a partial run does not replace the documented numbers
	}
	if err := run(cfg); err != nil {
		log.Fatal(err)
	}
}

// config is what the flags ask for.
type config struct {
	secrets, scaleTo, writers int
	rate                      float64
	idle                      time.Duration
	rounds, readReps          int
	methods                   map[string]bool
	conditions                []string
	saturated                 bool
	kmsctlArgs                [][]string // variants, by round
	profile                   string
	out                       string
}

// complete says whether the run measures every row of the goals, so its
// report may replace the documented one.
func (c config) complete() bool {
	return len(c.methods) == 3 && len(c.conditions) == 2 && c.saturated && c.scaleTo > c.secrets && len(c.kmsctlArgs) == 1
}

func mustResource(name string) rotation.Resource {
	r, err := rotation.ParseResource(name)
	if err != nil {
		panic(err)
	}
	return r
}
