package rotation

import (
	"context"
	"fmt"
	"strings"

	"github.com/kms-v2/kms-plugin/providers"
	"github.com/kms-v2/kms-plugin/rotation/etcdlayout"
)

// goal is the key a run moves the cluster to.
type goal struct {
	keyID string
	// rotating: the key changed in this run or in the one it resumes, so
	// the apiservers must be seen to switch before any rewrite.
	rotating bool
}

// decide picks the goal: an earlier run's recorded target, else a new (or
// pending) version when due, else the primary; and names the action.
func (r *runner) decide(ctx context.Context, lock *Lock, p plan) (goal, error) {
	if t := lock.Target(); t != "" {
		if v, ok := find(p.versions, t); ok && v.State != providers.StateDisabled {
			if err := r.distributed(t != p.primary.KeyID); err != nil {
				return goal{}, err
			}
			r.rep.Action = ActionResumed
			r.say("resume: an earlier run was rotating to %s; finishing it", t)
			return goal{keyID: t, rotating: true}, nil
		}
		r.say("resume: the recorded target %s is gone or disabled; ignoring it", t)
	}
	if !p.due.rotate {
		r.say("%s", p.due.why)
		switch {
		case p.census.Stale() > 0:
			r.rep.Action = ActionFinished
			r.say("finish: %d objects are not stored as the apiserver writes now; rewriting them", p.census.Stale())
		case p.due.young:
			r.rep.Action = ActionSkipped
		default:
			r.rep.Action = ActionNothing
		}
		return goal{keyID: p.primary.KeyID}, nil
	}
	if err := r.distributed(true); err != nil {
		return goal{}, err
	}
	r.rep.Action = ActionRotated
	r.say("rotate: %s", p.due.why)
	r.begin(PhaseCreate)
	defer r.end()
	v, ok := pending(p.versions, p.primary)
	if ok {
		r.say("create: reusing pending version %s", v.KeyID)
	} else {
		var err error
		if v, err = r.Rotator.CreateVersion(ctx); err != nil {
			return goal{}, fmt.Errorf("create: %w", err)
		}
		r.say("create: new version %s", v.KeyID)
	}
	// Recorded before the phase ends: a run killed right after creating
	// the version must leave it to the next run to finish.
	if err := lock.SetTarget(ctx, v.KeyID); err != nil {
		return goal{}, fmt.Errorf("create: record target: %w", err)
	}
	return goal{keyID: v.KeyID, rotating: true}, nil
}

// distributed refuses a new primary that only this node's plugin could
// decrypt with: per-node key state (a keyset file, a TPM) on more than one
// apiserver, or on an unknown number, unless the operator said every
// node's copy is kept the same. Nothing has changed when it refuses.
func (r *runner) distributed(promoting bool) error {
	if !promoting || r.opts.Scope != providers.ScopePerNode || r.opts.KeysetDistributed || len(r.APIServers) == 1 {
		return nil
	}
	n := fmt.Sprintf("%d apiservers", len(r.APIServers))
	if len(r.APIServers) == 0 {
		n = "an unknown number of apiservers (none could be listed)"
	}
	return fmt.Errorf("the encrypting provider keeps its keys per node (keyState: perNode) and the cluster has %s: a version made here reaches only this node's keyset, and the other nodes' plugins would fail to read every object written under it. Keep one keyset on every node (README: the file provider on HA control planes) and rerun with --keyset-distributed; nothing was changed: %w", n, ErrNotDistributed)
}

// switchTo promotes the goal after the propagation wait when it is not the
// primary yet, and confirms every apiserver writes with it before anything
// is rewritten.
func (r *runner) switchTo(ctx context.Context, p plan, g goal) error {
	r.rep.NewKeyID = g.keyID
	r.rep.Writers = p.writers.withKey(g.keyID)
	if !g.rotating {
		if p.census.Stale() == 0 {
			return nil
		}
		return r.confirm(ctx, r.rep.Writers, false, p.confirmWith)
	}
	if g.keyID != p.primary.KeyID {
		if err := r.promote(ctx, g.keyID); err != nil {
			return err
		}
	}
	return r.confirm(ctx, r.rep.Writers, true, p.confirmWith)
}

// promote waits until every plugin can decrypt with keyID, then makes it
// the primary.
func (r *runner) promote(ctx context.Context, keyID string) error {
	r.begin(PhasePropagate)
	if r.opts.Scope == providers.ScopeShared && r.opts.PropagationWait == 0 {
		r.say("propagate: key state is shared; every plugin looks %s up on first sight, no wait", keyID)
	} else {
		r.say("propagate: waiting %s so every plugin can decrypt with %s before any encrypts with it", r.opts.PropagationWait, keyID)
	}
	if err := sleep(ctx, r.opts.PropagationWait); err != nil {
		return err
	}
	r.end()
	r.begin(PhasePromote)
	defer r.end()
	if err := r.Rotator.Promote(ctx, keyID); err != nil {
		return fmt.Errorf("promote %s: %w", keyID, err)
	}
	r.say("promote: %s is the primary", keyID)
	return nil
}

// confirm makes sure every apiserver writes as w before anything is
// rewritten: a rewrite served by a lagging apiserver writes the old key
// back. The canary of resource with proves it; "" leaves the metrics only.
func (r *runner) confirm(ctx context.Context, w Writers, rotating bool, with string) error {
	r.begin(PhaseConfirm)
	defer r.end()
	if len(r.APIServers) == 0 {
		return r.confirmPassively(ctx, rotating)
	}
	want, res := w[with], canaryResource(with)
	if with == "" {
		want = etcdlayout.KMSv2Writer("", r.rep.NewKeyID)
	}
	results := make([]APIServerCheck, len(r.APIServers))
	done := make(chan struct{}, len(r.APIServers))
	for i, a := range r.APIServers {
		go func() {
			results[i] = a.Confirm(ctx, r.Etcd, want, res, r.opts.ConfirmInterval, r.opts.ConfirmTimeout)
			done <- struct{}{}
		}()
	}
	for range r.APIServers {
		<-done
	}
	r.rep.APIServers = results
	for _, a := range r.APIServers {
		if err := a.DeleteCanaries(ctx); err != nil {
			r.Logger.Warn("delete canary", "apiserver", a.URL, "error", err)
		}
	}
	return r.confirmed(ctx, results)
}

// confirmed turns the checks into the run's verdict.
func (r *runner) confirmed(ctx context.Context, results []APIServerCheck) error {
	var failed []string
	for _, c := range results {
		if c.Switched {
			r.say("confirm: %s writes with %s (%s, %s)", c.URL, r.rep.NewKeyID, strings.Join(c.By, "+"), c.Took)
		} else {
			failed = append(failed, fmt.Sprintf("%s: %s", c.URL, c.Error))
		}
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	if len(failed) > 0 {
		return fmt.Errorf("confirm: not rewriting (%s): %w", strings.Join(failed, "; "), ErrNotSwitched)
	}
	return nil
}

// confirmPassively waits the documented time when the apiservers cannot be
// reached one by one, unless the key predates this run.
func (r *runner) confirmPassively(ctx context.Context, rotating bool) error {
	if !rotating {
		r.say("confirm: apiservers cannot be reached one by one; the primary predates this run, not waiting (the census verifies)")
		return nil
	}
	r.say("confirm: apiservers cannot be reached one by one; waiting the documented %s (3 + N + M minutes) for all to switch", r.opts.PassiveWait)
	r.rep.PassiveWait = Duration(r.opts.PassiveWait)
	r.rep.PassiveWaitSeconds = r.rep.PassiveWait.Seconds()
	return sleep(ctx, r.opts.PassiveWait)
}

// canaryResource is the Resource of a canary resource name, or the zero
// Resource for "".
func canaryResource(name string) Resource {
	switch name {
	case "secrets":
		return secretsResource
	case "configmaps":
		return configMapsResource
	}
	return Resource{}
}

func find(vs []providers.KeyVersion, id string) (providers.KeyVersion, bool) {
	for _, v := range vs {
		if v.KeyID == id {
			return v, true
		}
	}
	return providers.KeyVersion{}, false
}

// pending is an enabled version newer than the primary: one created by a
// run that stopped before promoting it, reused rather than adding another.
func pending(vs []providers.KeyVersion, primary providers.KeyVersion) (providers.KeyVersion, bool) {
	var out providers.KeyVersion
	after, found := false, false
	for _, v := range vs {
		if v.KeyID == primary.KeyID {
			after = true
			continue
		}
		if after && v.State == providers.StateEnabled {
			out, found = v, true
		}
	}
	return out, found
}
