package rotation

import (
	"context"
	"fmt"
	"maps"
	"slices"
	"strings"

	"github.com/kms-v2/kms-plugin/rotation/etcdlayout"
)

// reencrypt rewrites every object not stored as the apiserver now writes,
// pass after pass, until a census finds none or MaxPasses is reached, and
// clears the lease's target once nothing remains.
func (r *runner) reencrypt(ctx context.Context, lock *Lock, p plan, g goal) error {
	w := r.rep.Writers
	if !g.rotating && p.census.Stale() == 0 {
		r.rep.CensusAfter, r.rep.Remaining = p.census, p.census.NotCurrent()
		return r.settle(ctx, lock)
	}
	if err := r.firstPass(ctx, p.census, w); err != nil {
		return r.afterFailedPass(ctx, lock, w, err)
	}
	for {
		r.begin(PhaseCensus)
		c, err := r.census(ctx, w)
		if err != nil {
			return err
		}
		r.rep.CensusAfter, r.rep.Remaining = c, c.NotCurrent()
		r.end()
		if c.Stale() == 0 || r.rep.Passes >= r.opts.MaxPasses {
			return r.settle(ctx, lock)
		}
		if err := r.stalePass(ctx, c, w); err != nil {
			return r.afterFailedPass(ctx, lock, w, err)
		}
	}
}

// settle clears the lease's target when nothing remains, and says whether
// the run left objects behind.
func (r *runner) settle(ctx context.Context, lock *Lock) error {
	if r.rep.Remaining > 0 {
		return fmt.Errorf("%d objects still not stored as the apiserver writes now after %d passes: %w", r.rep.Remaining, r.rep.Passes, ErrObjectsRemain)
	}
	if err := lock.SetTarget(ctx, ""); err != nil {
		return fmt.Errorf("clear target: %w", err)
	}
	return nil
}

// firstPass rewrites each resource with stale objects: by listing it
// through the apiserver when most are stale (right after a promote), or
// from an etcd scan of the stale ones when few are (a resumed run).
func (r *runner) firstPass(ctx context.Context, before *Census, w Writers) error {
	r.begin(PhaseRewrite)
	defer r.end()
	r.rep.Rewrite = map[string]*RewriteStats{}
	r.rep.Passes = 1
	for _, res := range r.opts.Resources {
		rc := before.Resource(res.Name)
		n := staleAgainst(rc, w[res.Name])
		if n == 0 {
			continue
		}
		var st RewriteStats
		var err error
		if 2*n < rc.Total {
			r.beginRewrite("rewrite "+res.Name+" (pass 1, stale only)", int64(n))
			st, err = r.engine().Rewrite(ctx, RewriteRequest{Resource: res, Etcd: r.Etcd, Writer: w[res.Name]})
		} else {
			r.beginRewrite("rewrite "+res.Name+" (pass 1)", int64(rc.Total))
			st, err = r.engine().Rewrite(ctx, RewriteRequest{Resource: res, Listed: true, Etcd: r.Etcd, Writer: w[res.Name]})
		}
		if err := r.record(res.Name, st, err); err != nil {
			return err
		}
	}
	return nil
}

// stalePass is a later pass: it patches only what census c found stale.
func (r *runner) stalePass(ctx context.Context, c *Census, w Writers) error {
	r.begin(PhaseRewrite)
	defer r.end()
	r.rep.Passes++
	for _, rc := range c.Resources {
		if rc.Stale == 0 {
			continue
		}
		res, _ := resourceNamed(r.opts.Resources, rc.Resource)
		r.beginRewrite(fmt.Sprintf("rewrite %s (pass %d, stale only)", res.Name, r.rep.Passes), int64(rc.Stale))
		st, err := r.engine().Rewrite(ctx, RewriteRequest{Resource: res, Etcd: r.Etcd, Writer: w[res.Name]})
		if err := r.record(res.Name, st, err); err != nil {
			return err
		}
	}
	return nil
}

// beginRewrite starts the progress line of a resource's pass; the
// limiter's figures are on it only when our own engine, which the limiter
// paces, rewrites.
func (r *runner) beginRewrite(label string, total int64) {
	_, ours := r.engine().(*Rewriter)
	r.Progress.BeginPaced(label, total, ours)
}

// record ends a resource's pass: progress, stats, and its error.
func (r *runner) record(name string, st RewriteStats, err error) error {
	r.Progress.End()
	if r.rep.Rewrite[name] == nil {
		r.rep.Rewrite[name] = &RewriteStats{Resource: name}
	}
	r.rep.Rewrite[name].add(st)
	if err != nil {
		return fmt.Errorf("rewrite %s: %w", name, err)
	}
	r.say("rewrite %s: %d rewritten, %d unchanged, %d conflicts, %d skipped, %d errors", name, st.Rewritten, st.Unchanged, st.Conflicts, st.Skipped, st.Errors)
	return nil
}

// staleAgainst is how many decodable objects of rc are not stored as w
// writes, from the counts alone (w may differ from the census's writer:
// after a promote it names the new key).
func staleAgainst(rc *ResourceCensus, w etcdlayout.Writer) int {
	if rc == nil {
		return 0
	}
	current := 0
	switch w.Encoding {
	case etcdlayout.EncodingKMSv2:
		current = rc.Objects(w.Provider, w.KeyID)
	case etcdlayout.EncodingPlain:
		current = rc.Plaintext
	}
	return rc.Total - rc.Undecodable - current
}

// censusLine summarises a census in one line.
func censusLine(c *Census) string {
	var parts []string
	for _, rc := range c.Resources {
		p := fmt.Sprintf("%s: %d objects, %d stale", rc.Resource, rc.Total, rc.Stale)
		var stored []string
		for _, s := range rc.ByProvider {
			mark := ""
			if s.Current {
				mark = " (current)"
			}
			stored = append(stored, fmt.Sprintf("%s/%s%s=%d", s.Provider, s.KeyID, mark, s.Objects))
		}
		if len(stored) > 0 {
			p += " [" + strings.Join(stored, " ") + "]"
		}
		for _, x := range []struct {
			label string
			n     int
		}{{"plaintext", rc.Plaintext}, {"other", rc.Other}, {"undecodable", rc.Undecodable}} {
			if x.n > 0 {
				p += fmt.Sprintf(" %s=%d", x.label, x.n)
			}
		}
		parts = append(parts, p)
	}
	return strings.Join(parts, "; ")
}

// usedKeys formats the references that block a retire.
func usedKeys(refs map[string]int) []string {
	var used []string
	for _, k := range slices.Sorted(maps.Keys(refs)) {
		if refs[k] > 0 {
			used = append(used, fmt.Sprintf("%s: %d objects", k, refs[k]))
		}
	}
	return used
}
