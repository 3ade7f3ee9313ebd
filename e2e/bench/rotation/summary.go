package main

import (
	"fmt"
	"runtime"
	"strings"
	"time"
)

// report is the "## Rotation" section: the setup, the goals with their
// verdicts, every run, the reads, and what explains the numbers.
func (b *bench) report() string {
	var s strings.Builder
	cfg := b.cfg
	fmt.Fprintf(&s, "## Rotation\n\n")
	fmt.Fprintf(&s, "`make bench-rotation ARGS=%q` (program `e2e/bench/rotation`), %s, on %d CPUs (%s/%s): etcd v3.7.0 (TLS with client certificates, as kubeadm sets it up), one kube-apiserver v1.37.2, kms-plugin (file keyset) and kube-controller-manager (garbage collector and storage-version migrator) on loopback. ",
		b.args(), time.Now().UTC().Format("2006-01-02"), runtime.NumCPU(), runtime.GOOS, runtime.GOARCH)
	fmt.Fprintf(&s, "%d secrets in one namespace, %d rounds, each in the conditions %s. ", cfg.secrets, cfg.rounds, strings.Join(cfg.conditions, " and "))
	if cfg.scaleTo > cfg.secrets {
		fmt.Fprintf(&s, "Then %d more secrets are created, and the census and one quiet kmsctl rotate are measured again at %d (the scale rows). ", cfg.scaleTo-cfg.secrets, cfg.scaleTo)
	}
	fmt.Fprintf(&s, "Every method runs right after its own promote (new key created, promoted, the apiserver confirmed on it) and re-encrypts every secret. ")
	fmt.Fprintf(&s, "kmsctl (both engines) runs as the shipped rotation ServiceAccount with a TokenRequest token; the run checked that its requests are answered under the shipped FlowSchema (X-Kubernetes-PF-FlowSchema-UID). kubectl runs as the cluster admin, as the documented procedure does. ")
	fmt.Fprintf(&s, "Meanwhile %d writers update their own secrets at %.0f writes/s each (paced, open loop); their latency is measured while idle (pooled per condition) and during each method. ", cfg.writers, cfg.rate)
	if len(b.neighbour) > 0 {
		var parts []string
		for _, n := range b.neighbour {
			parts = append(parts, fmt.Sprintf("%.0f %%", 100*n))
		}
		fmt.Fprintf(&s, "Busy: a neighbour shell loop ran for each busy round and used %s of a core. ", strings.Join(parts, ", "))
	}
	fmt.Fprintf(&s, "\n\n| row | goal | measured | verdict |\n|---|---|---|---|\n")
	for _, g := range b.goals() {
		fmt.Fprintf(&s, "| %s | %s | %s | **%s** |\n", g.row, g.want, g.got, g.verdict())
	}
	b.runsTable(&s)
	b.readsTable(&s)
	b.notes(&s)
	return s.String()
}

// args are the flags this run was given, for the command line to repeat it.
func (b *bench) args() string {
	c := b.cfg
	return fmt.Sprintf("-secrets %d -scale-to %d -rounds %d -conditions %s", c.secrets, c.scaleTo, c.rounds, strings.Join(c.conditions, ","))
}

func (b *bench) runsTable(s *strings.Builder) {
	fmt.Fprintf(s, "\n| method | condition | round | secrets | wall time | secrets/s | peak RSS | peak anonymous RSS | writers p50 | writers p99 | p99 / idle | writer errors | CPU during it |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")
	for _, cond := range b.cfg.conditions {
		if w := b.idle[cond]; w != nil {
			fmt.Fprintf(s, "| idle | %s | all | | | | | | %s | %s | | %d | |\n", cond, w.p(0.5).Round(100*time.Microsecond), w.p(0.99).Round(100*time.Microsecond), w.errors)
		}
	}
	for _, r := range b.results {
		writers := "– | – | –" // the saturated round runs without them
		if len(r.writers.latencies) > 0 {
			writers = fmt.Sprintf("%s | %s | %.2fx", r.writers.p(0.5).Round(100*time.Microsecond), r.writers.p(0.99).Round(100*time.Microsecond), b.idleRatio(r))
		}
		fmt.Fprintf(s, "| %s | %s | %s | %d | %s | %.0f | %s | %s | %s | %d | %s |\n", strings.ReplaceAll(r.name, "|", "\\|"), r.cond, roundName(r.round), r.objects,
			r.wall.Round(10*time.Millisecond), rate(r), sumMiB(r.rssKiB), sumMiB(r.anonKiB), writers, r.writers.errors, strings.TrimPrefix(cpuLine(r.cpu), "CPU "))
	}
}

func (b *bench) readsTable(s *strings.Builder) {
	if len(b.reads) == 0 {
		return
	}
	fmt.Fprintf(s, "\n| secrets | census scan (median) | raw etcd range read (median) | census / raw | census process (median) | census peak RSS | census peak anonymous RSS |\n|---|---|---|---|---|---|---|\n")
	id := func(x float64) float64 { return x }
	for _, r := range b.reads {
		wall := medianOf(r.censusWall, func(d time.Duration) float64 { return d.Seconds() })
		fmt.Fprintf(s, "| %d | %.0f/s | %.0f/s | %.2fx | %.2fs | %s | %s |\n", r.objects, medianOf(r.census, id), medianOf(r.raw, id), r.ratio(), wall, mib(r.rssKiB), mib(r.anonKiB))
	}
}

// roundName is the round column: 0 is a run outside the rounds.
func roundName(n int) string {
	if n == 0 {
		return "–"
	}
	return fmt.Sprint(n)
}

func sumMiB(vals []int64) string {
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

// notes are the details of the median runs: phases, outcomes, and what
// the measurements mean.
func (b *bench) notes(s *strings.Builder) {
	fmt.Fprintln(s)
	byWall := func(x, y *result) bool { return x.wall < y.wall }
	for _, m := range []string{methodKmsctl, methodSVM, methodSaturated, methodScale, methodKubectl} {
		rs := b.sel(m, "")
		if len(rs) == 0 {
			continue
		}
		r := median(rs, byWall)
		line := fmt.Sprintf("- %s (%s, round %s): %s", r.name, r.cond, roundName(r.round), r.note)
		if r.report != nil {
			var phases []string
			for _, p := range r.report.Phases {
				phases = append(phases, p.Phase+" "+p.Duration.String())
			}
			line += "; phases " + strings.Join(phases, ", ")
		}
		fmt.Fprintln(s, line+".")
	}
	fmt.Fprintln(s, "- kmsctl's time includes its census before and after (read from etcd) and the apiserver confirmation; the kubectl pipeline proves nothing afterwards, holds every secret in memory twice, and fails on a conflicting write.")
	fmt.Fprintln(s, "- The saturated round runs kmsctl as the cluster admin (exempt from priority and fairness) with 64 patches in flight from the start and no latency backoff, and the writers paused: the control plane's own rewrite rate, not the FlowSchema's share.")
	fmt.Fprintln(s, "- The census rate is its own scan time (its report's duration): the process start and the etcd proof, a fixed cost, are in the process column. The raw read is clientv3 Get pages of the same size over the same prefix, in the bench process.")
	fmt.Fprintln(s, "- Peak RSS is the kernel's maxrss, which counts the pages of the executable it touched (file-backed, shared); the anonymous column, sampled every 20 ms from /proc, is the memory the work itself uses.")
}
