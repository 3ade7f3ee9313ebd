package rotation

import (
	"context"
	"errors"
	"fmt"
	"io"
	"maps"
	"slices"
	"strings"
	"time"

	"github.com/hashicorp/go-hclog"
	"k8s.io/client-go/dynamic"

	"github.com/kms-v2/kms-plugin/providers"
)

// Errors a run ends with; the CLI maps each to its own exit code.
var (
	// ErrObjectsRemain means objects are still under an old key after the
	// last rewrite pass (or could not be checked).
	ErrObjectsRemain = errors.New("objects remain under an old key")
	// ErrRetireRefused means --retire found the old key still referenced.
	ErrRetireRefused = errors.New("retire refused: the old key is still referenced")
	// ErrNotSwitched means an apiserver did not prove it uses the new key,
	// so rewriting would risk writing the old key back.
	ErrNotSwitched = errors.New("an apiserver has not switched to the new key")
)

// Phases of a run, in order; AfterPhase hooks and reports use these names.
const (
	PhasePlan      = "plan"
	PhaseCreate    = "create"
	PhasePropagate = "propagate"
	PhasePromote   = "promote"
	PhaseConfirm   = "confirm"
	PhaseRewrite   = "rewrite"
	PhaseCensus    = "census"
	PhaseRetire    = "retire"
)

// Options say what one run should do.
type Options struct {
	Resources []Resource
	// Force rotates to a new key version now.
	Force bool
	// IfOlderThan rotates when the primary is older than this (0: never).
	IfOlderThan time.Duration
	// Retire disables old versions once etcd proves nothing uses them.
	Retire bool
	// DryRun plans and counts, and changes nothing.
	DryRun bool
	// PropagationWait is how long to wait after creating a version before
	// promoting it, so every plugin instance can decrypt with it first (at
	// least the plugins' refresh interval).
	PropagationWait time.Duration
	// ConfirmTimeout bounds the wait for each apiserver to switch.
	ConfirmTimeout time.Duration
	// ConfirmInterval is the pause between nudges.
	ConfirmInterval time.Duration
	// PassiveWait is waited instead of confirming when the apiservers
	// cannot be reached one by one (3 + N + M minutes).
	PassiveWait time.Duration
	// MaxPasses bounds the rewrite passes (default 5).
	MaxPasses int
	// Identity names this run in the lease.
	Identity string
	// LeaseDuration is how long a lease lasts without renewal.
	LeaseDuration time.Duration
	// AfterPhase, when set, is called after each phase completes (tests use
	// it to crash a run at a chosen point).
	AfterPhase func(phase string)
}

// Rotation holds what a run talks to. Store nil means no etcd access: the
// census, the canary and --retire are then unavailable. APIServers nil
// means they cannot be reached one by one.
type Rotation struct {
	Rotator    providers.Rotator
	Kube       dynamic.Interface
	Rewriter   *Rewriter
	Store      Store
	APIServers []*APIServer
	Logger     hclog.Logger
	// Out receives human progress messages (stderr).
	Out      io.Writer
	Progress *Progress
	Metrics  *Metrics
}

// Report is the outcome of one run (`kmsctl rotate -o json`).
type Report struct {
	// Action is what the run decided: "rotated", "resumed", "finished",
	// "nothing to do", "skipped" (primary younger than --if-older-than).
	Action string `json:"action"`
	DryRun bool   `json:"dryRun,omitempty"`
	// OldKeyID is the primary before the run; NewKeyID after it.
	OldKeyID string `json:"oldKeyID"`
	NewKeyID string `json:"newKeyID"`
	// PrimaryAge is the age of the primary at planning time.
	PrimaryAge Duration         `json:"primaryAge"`
	APIServers []APIServerCheck `json:"apiservers,omitempty"`
	// PassiveWait is set when the apiservers could not be confirmed one by
	// one and the documented wait was used instead.
	PassiveWait  Duration                 `json:"passiveWait,omitempty"`
	Rewrite      map[string]*RewriteStats `json:"rewrite,omitempty"`
	Passes       int                      `json:"passes"`
	CensusBefore *Census                  `json:"censusBefore,omitempty"`
	CensusAfter  *Census                  `json:"censusAfter,omitempty"`
	// Remaining is the number of objects under an old key at the end (-1
	// when there was no etcd access to check).
	Remaining int `json:"remaining"`
	// Retired lists the versions disabled; RetireRefused says why none was.
	Retired       []string       `json:"retired,omitempty"`
	RetireRefused string         `json:"retireRefused,omitempty"`
	References    map[string]int `json:"references,omitempty"`
	Phases        []PhaseTiming  `json:"phases"`
	Duration      Duration       `json:"duration"`
}

// PhaseTiming is how long one phase took.
type PhaseTiming struct {
	Phase    string   `json:"phase"`
	Duration Duration `json:"duration"`
}

// run state shared by the phases of one Run.
type runner struct {
	*Rotation
	opts    Options
	rep     *Report
	started time.Time
	phase   string
	phaseAt time.Time
}

func (r *runner) begin(phase string) {
	r.phase, r.phaseAt = phase, time.Now()
	r.Metrics.setPhase(phase)
}

func (r *runner) end() {
	r.rep.Phases = append(r.rep.Phases, PhaseTiming{Phase: r.phase, Duration: Duration(time.Since(r.phaseAt))})
	if r.opts.AfterPhase != nil {
		r.opts.AfterPhase(r.phase)
	}
}

func (r *runner) say(format string, args ...any) {
	if r.Out != nil {
		fmt.Fprintf(r.Out, format+"\n", args...)
	}
}

// Run performs one rotation run. It always first finishes a rotation in
// progress (a target recorded in the lease, or objects under a key other
// than the primary), then rotates to a new version only with Force or when
// the primary is older than IfOlderThan. Every step is derived from observed
// state (the provider's versions, the lease, etcd), so running it again
// after a crash at any point finishes the job without redoing done work.
func (rot *Rotation) Run(ctx context.Context, opts Options) (*Report, error) {
	if opts.MaxPasses <= 0 {
		opts.MaxPasses = 5
	}
	if opts.ConfirmTimeout <= 0 {
		opts.ConfirmTimeout = 3 * time.Minute
	}
	if opts.ConfirmInterval <= 0 {
		opts.ConfirmInterval = 2 * time.Second
	}
	if rot.Logger == nil {
		rot.Logger = hclog.NewNullLogger()
	}
	r := &runner{Rotation: rot, opts: opts, rep: &Report{DryRun: opts.DryRun, Remaining: -1}, started: time.Now()}
	defer func() { r.rep.Duration = Duration(time.Since(r.started)) }()
	return r.rep, r.run(ctx)
}

func (r *runner) run(ctx context.Context) error {
	// Plan.
	r.begin(PhasePlan)
	versions, err := r.Rotator.Versions(ctx)
	if err != nil {
		return fmt.Errorf("plan: list key versions: %w", err)
	}
	primary, ok := primaryOf(versions)
	if !ok {
		return fmt.Errorf("plan: the provider has no primary key version; run `kmsctl keys init`")
	}
	r.rep.OldKeyID, r.rep.NewKeyID = primary.KeyID, primary.KeyID
	if !primary.Created.IsZero() {
		r.rep.PrimaryAge = Duration(time.Since(primary.Created))
	}
	r.say("plan: primary %s, %s old", primary.KeyID, ageString(primary.Created))
	for _, a := range r.APIServers {
		if err := a.Readyz(ctx); err != nil {
			r.say("plan: apiserver %s is not ready: %v", a.URL, err)
		}
	}
	if r.Store != nil {
		c, err := TakeCensus(ctx, r.Store, r.opts.Resources, primary.KeyID, CensusOptions{})
		if err != nil {
			return fmt.Errorf("plan: %w", err)
		}
		r.rep.CensusBefore = c
		r.Metrics.setCensus(c)
		r.say("plan: census %s", censusLine(c))
	}
	due, why := r.due(primary)
	r.end()

	if r.opts.DryRun {
		r.rep.Action = "dry run"
		if r.rep.CensusBefore != nil {
			r.rep.Remaining = r.rep.CensusBefore.Stale()
		}
		r.say("dry run: %s; would rewrite %s; nothing changed", why, remainingString(r.rep.Remaining))
		return nil
	}

	lock, err := AcquireLock(ctx, r.Kube, DefaultLeaseNamespace, DefaultLeaseName, r.opts.Identity, r.opts.LeaseDuration)
	if err != nil {
		return err
	}
	ctx, release := lock.Hold(ctx)
	defer func() {
		release()
		rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
		defer cancel()
		if err := lock.Release(rctx); err != nil {
			r.Logger.Warn("release lease", "error", err)
		}
	}()

	// Create (or adopt) the target version.
	target := ""
	if t := lock.Target(); t != "" {
		if v, ok := find(versions, t); ok && v.State != providers.StateDisabled {
			target = t
			r.rep.Action = "resumed"
			r.say("resume: an earlier run was rotating to %s; finishing it", t)
		} else {
			r.say("resume: the recorded target %s is gone or disabled; ignoring it", t)
		}
	}
	if target == "" && due {
		r.rep.Action = "rotated"
		r.say("rotate: %s", why)
	}
	if target == "" && !due {
		r.say("%s", why)
	}
	if target != "" || due {
		r.begin(PhaseCreate)
		if target == "" {
			if p, ok := pending(versions, primary); ok {
				target = p.KeyID
				r.say("create: reusing pending version %s", target)
			} else {
				v, err := r.Rotator.CreateVersion(ctx)
				if err != nil {
					return fmt.Errorf("create: %w", err)
				}
				target = v.KeyID
				r.say("create: new version %s", target)
			}
		}
		if err := lock.SetTarget(ctx, target); err != nil {
			return fmt.Errorf("create: record target: %w", err)
		}
		r.end()
		if target != primary.KeyID {
			r.begin(PhasePropagate)
			r.say("propagate: waiting %s so every plugin can decrypt with %s before any encrypts with it", r.opts.PropagationWait, target)
			if err := sleep(ctx, r.opts.PropagationWait); err != nil {
				return err
			}
			r.end()
			r.begin(PhasePromote)
			if err := r.Rotator.Promote(ctx, target); err != nil {
				return fmt.Errorf("promote %s: %w", target, err)
			}
			r.say("promote: %s is the primary", target)
			r.end()
		}
		r.rep.NewKeyID = target
	}
	current := r.rep.NewKeyID

	// What is stale against the primary now? Without etcd, only a rotation
	// started or resumed here is known to need a rewrite.
	stale := map[string]int{}
	needRewrite := target != ""
	if r.rep.CensusBefore != nil {
		for _, rc := range r.rep.CensusBefore.Resources {
			for k, n := range rc.ByKeyID {
				if k != current {
					stale[rc.Resource] += n
				}
			}
		}
		needRewrite = len(stale) > 0
	} else if needRewrite {
		for _, res := range r.opts.Resources {
			stale[res.Name] = -1
		}
	}
	if r.rep.Action == "" {
		if needRewrite {
			r.rep.Action = "finished"
			r.say("finish: objects are still under an old key; rewriting them to %s", current)
		} else {
			r.rep.Action = "nothing to do"
			if strings.HasPrefix(why, "primary") {
				r.rep.Action = "skipped"
			}
		}
	}

	if needRewrite {
		if err := r.confirm(ctx, current, target != ""); err != nil {
			return err
		}
		if err := r.rewrite(ctx, current, stale); err != nil {
			return err
		}
	} else if r.rep.CensusBefore != nil {
		r.rep.CensusAfter = r.rep.CensusBefore
		r.rep.Remaining = 0
	}
	if r.rep.Remaining == 0 {
		if err := lock.SetTarget(ctx, ""); err != nil {
			return fmt.Errorf("clear target: %w", err)
		}
	}
	var result error
	switch {
	case r.rep.Remaining > 0:
		result = fmt.Errorf("%d objects still under an old key after %d passes: %w", r.rep.Remaining, r.rep.Passes, ErrObjectsRemain)
	case r.rep.Remaining < 0 && needRewrite:
		result = fmt.Errorf("no etcd access, the rewrite cannot be verified: %w", ErrObjectsRemain)
	}
	if r.opts.Retire {
		if err := r.retire(ctx, current); err != nil {
			return errors.Join(result, err)
		}
	}
	return result
}

// due says whether the flags ask for a new version, and why in words.
func (r *runner) due(primary providers.KeyVersion) (bool, string) {
	switch {
	case r.opts.Force:
		return true, "forced rotation (--force)"
	case r.opts.IfOlderThan > 0 && primary.Created.IsZero():
		return false, "primary has no creation time; not rotating on age (use --force)"
	case r.opts.IfOlderThan > 0 && time.Since(primary.Created) > r.opts.IfOlderThan:
		return true, fmt.Sprintf("primary is %s old, older than %s", ageString(primary.Created), r.opts.IfOlderThan)
	case r.opts.IfOlderThan > 0:
		return false, fmt.Sprintf("primary is %s old, younger than %s: not rotating", ageString(primary.Created), r.opts.IfOlderThan)
	}
	return false, "no new version asked for (--force or --if-older-than)"
}

// confirm makes sure every apiserver encrypts with keyID before anything
// is rewritten: a rewrite served by a lagging apiserver writes the old key
// back.
func (r *runner) confirm(ctx context.Context, keyID string, rotating bool) error {
	r.begin(PhaseConfirm)
	defer r.end()
	if len(r.APIServers) == 0 {
		if !rotating {
			r.say("confirm: apiservers cannot be reached one by one; the primary predates this run, not waiting (the census verifies)")
			return nil
		}
		r.say("confirm: apiservers cannot be reached one by one; waiting the documented %s (3 + N + M minutes) for all to switch", r.opts.PassiveWait)
		r.rep.PassiveWait = Duration(r.opts.PassiveWait)
		return sleep(ctx, r.opts.PassiveWait)
	}
	results := make([]APIServerCheck, len(r.APIServers))
	done := make(chan int)
	for i, a := range r.APIServers {
		go func() {
			results[i] = a.Confirm(ctx, r.Store, keyID, r.opts.ConfirmInterval, r.opts.ConfirmTimeout)
			done <- i
		}()
	}
	for range r.APIServers {
		<-done
	}
	r.rep.APIServers = results
	var failed []string
	for _, c := range results {
		if c.Switched {
			r.say("confirm: %s uses %s (%s, %s)", c.URL, keyID, strings.Join(c.By, "+"), c.Took)
		} else {
			failed = append(failed, fmt.Sprintf("%s: %s", c.URL, c.Error))
		}
	}
	for _, a := range r.APIServers {
		if err := a.DeleteCanary(ctx); err != nil {
			r.Logger.Warn("delete canary", "apiserver", a.URL, "error", err)
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

// rewrite runs the passes: the first lists and patches each stale
// resource, later ones patch only what the census still finds stale.
func (r *runner) rewrite(ctx context.Context, current string, stale map[string]int) error {
	r.begin(PhaseRewrite)
	r.rep.Rewrite = map[string]*RewriteStats{}
	var err error
	for _, res := range r.opts.Resources {
		n, ok := stale[res.Name]
		if !ok {
			continue
		}
		total := int64(n)
		if c := r.rep.CensusBefore; c != nil {
			for _, rc := range c.Resources {
				if rc.Resource == res.Name {
					total = int64(rc.Total)
				}
			}
		}
		var st RewriteStats
		if n >= 0 && int64(n)*2 < total {
			// Most objects are already done (a resumed run): patch only
			// the stale ones the census found, not everything.
			r.Progress.Begin("rewrite "+res.Name+" (pass 1, stale only)", int64(n))
			st, err = r.Rewriter.RewriteStale(ctx, res, r.Store, current)
		} else {
			r.Progress.Begin("rewrite "+res.Name+" (pass 1)", total)
			st, err = r.Rewriter.RewriteListed(ctx, res)
		}
		r.Progress.End()
		r.addStats(res.Name, st)
		if err != nil {
			return fmt.Errorf("rewrite %s: %w", res.Name, err)
		}
		r.say("rewrite %s: %d rewritten, %d unchanged, %d conflicts, %d skipped, %d errors", res.Name, st.Rewritten, st.Unchanged, st.Conflicts, st.Skipped, st.Errors)
	}
	r.rep.Passes = 1
	r.end()
	if r.Store == nil {
		return nil
	}
	for {
		r.begin(PhaseCensus)
		c, err := TakeCensus(ctx, r.Store, r.opts.Resources, current, CensusOptions{})
		if err != nil {
			return err
		}
		r.rep.CensusAfter, r.rep.Remaining = c, c.Stale()
		r.Metrics.setCensus(c)
		r.say("census: %s", censusLine(c))
		r.end()
		if c.Stale() == 0 || r.rep.Passes >= r.opts.MaxPasses {
			return nil
		}
		r.begin(PhaseRewrite)
		r.rep.Passes++
		for _, rc := range c.Resources {
			if rc.Stale == 0 {
				continue
			}
			res, _ := resourceNamed(r.opts.Resources, rc.Resource)
			r.Progress.Begin(fmt.Sprintf("rewrite %s (pass %d, stale only)", res.Name, r.rep.Passes), int64(rc.Stale))
			st, err := r.Rewriter.RewriteStale(ctx, res, r.Store, current)
			r.Progress.End()
			r.addStats(res.Name, st)
			if err != nil {
				return fmt.Errorf("rewrite %s: %w", res.Name, err)
			}
		}
		r.end()
	}
}

func (r *runner) addStats(name string, st RewriteStats) {
	if r.rep.Rewrite[name] == nil {
		r.rep.Rewrite[name] = &RewriteStats{Resource: name}
	}
	r.rep.Rewrite[name].add(st)
}

// retire disables every enabled version older than the primary, but only
// after a scan of all of /registry (not only the rotated resources) shows
// no object references it.
func (r *runner) retire(ctx context.Context, current string) error {
	r.begin(PhaseRetire)
	defer r.end()
	refuse := func(why string) error {
		r.rep.RetireRefused = why
		r.say("retire: refused: %s", why)
		return fmt.Errorf("%s: %w", why, ErrRetireRefused)
	}
	if r.Store == nil {
		return refuse("no etcd access: nothing proves the old key is unused")
	}
	if r.rep.Remaining != 0 {
		return refuse(fmt.Sprintf("%s under an old key", remainingString(r.rep.Remaining)))
	}
	versions, err := r.Rotator.Versions(ctx)
	if err != nil {
		return fmt.Errorf("retire: %w", err)
	}
	var old []string
	for _, v := range versions {
		if v.KeyID == current {
			break // versions are oldest first; newer pending ones stay
		}
		if v.State == providers.StateEnabled {
			old = append(old, v.KeyID)
		}
	}
	if len(old) == 0 {
		r.say("retire: no enabled version older than the primary")
		return nil
	}
	refs, err := KeyReferences(ctx, r.Store, old, 0)
	if err != nil {
		return fmt.Errorf("retire: %w", err)
	}
	r.rep.References = refs
	var used []string
	for _, k := range slices.Sorted(maps.Keys(refs)) {
		if refs[k] > 0 {
			used = append(used, fmt.Sprintf("%s: %d objects", k, refs[k]))
		}
	}
	if len(used) > 0 {
		return refuse("etcd still references old keys (" + strings.Join(used, ", ") + ")")
	}
	for _, k := range old {
		if err := r.Rotator.Disable(ctx, k); err != nil {
			return fmt.Errorf("retire %s: %w", k, err)
		}
		r.rep.Retired = append(r.rep.Retired, k)
		r.say("retire: disabled %s (no object in etcd uses it)", k)
	}
	return nil
}

func primaryOf(vs []providers.KeyVersion) (providers.KeyVersion, bool) {
	for _, v := range vs {
		if v.State == providers.StatePrimary {
			return v, true
		}
	}
	return providers.KeyVersion{}, false
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
	after := false
	var out providers.KeyVersion
	found := false
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

func resourceNamed(rs []Resource, name string) (Resource, bool) {
	for _, r := range rs {
		if r.Name == name {
			return r, true
		}
	}
	return Resource{}, false
}

func sleep(ctx context.Context, d time.Duration) error {
	if d <= 0 {
		return nil
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}

func ageString(t time.Time) string {
	if t.IsZero() {
		return "unknown age"
	}
	return time.Since(t).Round(time.Second).String()
}

func remainingString(n int) string {
	if n < 0 {
		return "an unknown number of objects (no etcd access)"
	}
	return fmt.Sprintf("%d objects", n)
}

// censusLine summarises a census in one line.
func censusLine(c *Census) string {
	var parts []string
	for _, rc := range c.Resources {
		keys := make([]string, 0, len(rc.ByKeyID))
		for _, k := range slices.Sorted(maps.Keys(rc.ByKeyID)) {
			mark := ""
			if k == c.CurrentKeyID {
				mark = " (current)"
			}
			keys = append(keys, fmt.Sprintf("%s%s=%d", k, mark, rc.ByKeyID[k]))
		}
		p := fmt.Sprintf("%s: %d objects, %d stale", rc.Resource, rc.Total, rc.Stale)
		if len(keys) > 0 {
			p += " [" + strings.Join(keys, " ") + "]"
		}
		if rc.Unencrypted > 0 {
			p += fmt.Sprintf(" unencrypted=%d", rc.Unencrypted)
		}
		if rc.Undecodable > 0 {
			p += fmt.Sprintf(" undecodable=%d", rc.Undecodable)
		}
		parts = append(parts, p)
	}
	return strings.Join(parts, "; ")
}
