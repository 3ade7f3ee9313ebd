package main

import (
	"fmt"
	"strings"
)

// goal is one row of issue 13's table: what was measured and whether it
// meets the goal; ok is nil when the run did not measure it.
type goal struct {
	row, want, got string
	ok             *bool
}

func (g goal) verdict() string {
	if g.ok == nil {
		return "not measured in this run"
	}
	return verdict(*g.ok)
}

func is(ok bool) *bool { return &ok }

// pairs is, for each condition and round, the wall-time ratio of method a
// to method b (a's time over b's: how many times faster b is).
func (b *bench) pairs(a, bm string) (all []float64, text []string) {
	for _, cond := range b.cfg.conditions {
		for round := 1; round <= b.cfg.rounds; round++ {
			ra, rb := b.find(a, cond, round), b.find(bm, cond, round)
			if ra == nil || rb == nil {
				continue
			}
			r := ra.wall.Seconds() / rb.wall.Seconds()
			all = append(all, r)
			text = append(text, fmt.Sprintf("%s %d: %.2fx", cond, round, r))
		}
	}
	return all, text
}

func (b *bench) find(method, cond string, round int) *result {
	for _, r := range b.results {
		if r.method == method && r.cond == cond && r.round == round {
			return r
		}
	}
	return nil
}

// sel is every result of a method in a condition ("" for any).
func (b *bench) sel(method, cond string) []*result {
	var out []*result
	for _, r := range b.results {
		if r.method == method && (cond == "" || r.cond == cond) {
			out = append(out, r)
		}
	}
	return out
}

func (b *bench) goals() []goal {
	return []goal{b.goalKubectl(), b.goalSVM(), b.goalWriters(), b.goalSaturated(), b.goalReads(), b.goalMemory(), b.goalPerObject()}
}

func (b *bench) goalKubectl() goal {
	g := goal{row: "kmsctl rotate (default) vs kubectl get\\|replace", want: "≥ 1.4x faster in every round, quiet and busy"}
	all, text := b.pairs(methodKubectl, methodKmsctl)
	if len(all) > 0 {
		worst := slicesMax(all, func(x, y float64) bool { return x > y })
		g.got, g.ok = fmt.Sprintf("worst %.2fx (%s)", worst, strings.Join(text, ", ")), is(worst >= 1.4)
	}
	return g
}

func (b *bench) goalSVM() goal {
	g := goal{row: "kmsctl rotate vs StorageVersionMigration", want: "≥ 2x faster"}
	all, text := b.pairs(methodSVM, methodKmsctl)
	if len(all) > 0 {
		med := medianOf(all, func(x float64) float64 { return x })
		g.got, g.ok = fmt.Sprintf("median %.2fx (%s)", med, strings.Join(text, ", ")), is(med >= 2)
	}
	return g
}

// idleRatio is the writers' p99 during r over their idle p99 in the same
// condition.
func (b *bench) idleRatio(r *result) float64 {
	idle := b.idle[r.cond]
	if idle == nil || idle.p(0.99) == 0 {
		return 0
	}
	return float64(r.writers.p(0.99)) / float64(idle.p(0.99))
}

func (b *bench) goalWriters() goal {
	g := goal{row: "writers' p99 during kmsctl (as the rotation ServiceAccount, under the shipped FlowSchema)", want: "≤ 2x idle"}
	var parts []string
	ok := true
	for _, cond := range b.cfg.conditions {
		rs := b.sel(methodKmsctl, cond)
		if len(rs) == 0 {
			continue
		}
		med := medianOf(rs, b.idleRatio)
		worst := b.idleRatio(slicesMax(rs, func(x, y *result) bool { return b.idleRatio(x) < b.idleRatio(y) }))
		parts = append(parts, fmt.Sprintf("%s: median %.2fx, worst round %.2fx", cond, med, worst))
		ok = ok && med <= 2
	}
	if len(parts) > 0 {
		g.got, g.ok = strings.Join(parts, "; "), is(ok)
	}
	return g
}

func rate(r *result) float64 { return float64(r.objects) / r.wall.Seconds() }

func (b *bench) goalSaturated() goal {
	g := goal{row: "kmsctl rotate (default, quiet, with writers) vs the saturated rewrite rate (no pacing, no writers)", want: "≥ 0.7x"}
	ks, sat := b.sel(methodKmsctl, conditionQuiet), b.sel(methodSaturated, "")
	if len(ks) > 0 && len(sat) > 0 {
		k, s := medianOf(ks, rate), rate(sat[0])
		g.got, g.ok = fmt.Sprintf("%.2fx (%.0f vs %.0f secrets/s)", k/s, k, s), is(k/s >= 0.7)
	}
	return g
}

func (b *bench) goalReads() goal {
	g := goal{row: "census read rate vs raw paginated etcd range read", want: "≥ 0.8x"}
	var parts []string
	ok := true
	for _, r := range b.reads {
		x := r.ratio()
		parts = append(parts, fmt.Sprintf("%.2fx at %d secrets", x, r.objects))
		ok = ok && x >= 0.8
	}
	if len(parts) > 0 {
		g.got, g.ok = strings.Join(parts, ", "), is(ok)
	}
	return g
}

func (r *reads) ratio() float64 {
	id := func(x float64) float64 { return x }
	return medianOf(r.census, id) / medianOf(r.raw, id)
}

func (b *bench) goalMemory() goal {
	g := goal{row: "census and rotate peak anonymous RSS, large vs base size", want: "growth ≤ 10 %"}
	base, scaled := b.sel(methodKmsctl, conditionQuiet), b.sel(methodScale, "")
	if len(b.reads) < 2 || len(base) == 0 || len(scaled) == 0 {
		return g
	}
	census := float64(b.reads[1].anonKiB)/float64(b.reads[0].anonKiB) - 1
	rotBase := medianOf(base, func(r *result) float64 { return float64(r.anonKiB[0]) })
	rotate := float64(scaled[0].anonKiB[0])/rotBase - 1
	g.got = fmt.Sprintf("census %+.0f %% (%s → %s), rotate %+.0f %% (%s → %s), %d → %d secrets",
		100*census, mib(b.reads[0].anonKiB), mib(b.reads[1].anonKiB), 100*rotate, mib(int64(rotBase)), mib(scaled[0].anonKiB[0]), b.reads[0].objects, b.reads[1].objects)
	g.ok = is(census <= 0.10 && rotate <= 0.10)
	return g
}

func (b *bench) goalPerObject() goal {
	g := goal{row: "per-object rotate time, large vs base size", want: "≤ 1.1x"}
	base, scaled := b.sel(methodKmsctl, conditionQuiet), b.sel(methodScale, "")
	if len(base) == 0 || len(scaled) == 0 {
		return g
	}
	per := func(r *result) float64 { return r.wall.Seconds() / float64(r.objects) }
	bp, sp := medianOf(base, per), per(scaled[0])
	g.got, g.ok = fmt.Sprintf("%.2fx (%.2f ms vs %.2f ms per secret)", sp/bp, 1000*sp, 1000*bp), is(sp/bp <= 1.1)
	return g
}
