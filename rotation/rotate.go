package rotation

import (
	"context"
	"errors"
	"fmt"
	"io"
	"time"

	"github.com/hashicorp/go-hclog"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/metadata"

	"github.com/kms-v2/kms-plugin/providers"
)

// Errors a run ends with; the CLI maps each to its own exit code.
var (
	// ErrObjectsRemain means objects are still not stored as the apiserver
	// writes now after the last rewrite pass.
	ErrObjectsRemain = errors.New("objects remain under an old key or provider")
	// ErrRetireRefused means --retire found the old key still referenced.
	ErrRetireRefused = errors.New("retire refused: the old key is still referenced")
	// ErrNotSwitched means an apiserver did not prove it uses the new key,
	// so rewriting would risk writing the old key back.
	ErrNotSwitched = errors.New("an apiserver has not switched to the new key")
	// ErrNotDistributed means a new version of a per-node provider would
	// reach only this node's plugin, so promoting it was refused.
	ErrNotDistributed = errors.New("refused: per-node key state not known to be distributed")
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

// Action is what a run decided to do.
type Action string

// Actions of a run.
const (
	// ActionRotated: a new version was created (or a pending one adopted)
	// and everything moved to it.
	ActionRotated Action = "rotated"
	// ActionResumed: an earlier run's target, recorded in the lease, was
	// finished.
	ActionResumed Action = "resumed"
	// ActionFinished: objects not stored as the apiserver writes now (an
	// old key, another provider, plaintext) were rewritten.
	ActionFinished Action = "finished"
	// ActionNothing: everything was already current.
	ActionNothing Action = "nothing to do"
	// ActionSkipped: the primary is younger than --if-older-than.
	ActionSkipped Action = "skipped"
	// ActionDryRun: planned and counted only.
	ActionDryRun Action = "dry run"
)

// Options say what one run should do.
type Options struct {
	Resources []Resource
	// EncryptionConfig, when set, is the apiservers' EncryptionConfiguration:
	// how each resource is written, for resources no canary can show.
	EncryptionConfig *EncryptionConfig
	// Force rotates to a new key version now.
	Force bool
	// IfOlderThan rotates when the primary is older than this (0: never).
	IfOlderThan time.Duration
	// Retire disables old versions once etcd proves nothing uses them.
	Retire bool
	// KeepReadable are etcd snapshots that must stay restorable: Retire
	// refuses, before disabling anything, when one needs a version it
	// would disable.
	KeepReadable KeepReadable
	// DryRun plans and counts, and changes nothing but kmsctl's canaries.
	DryRun bool
	// PropagationWait is how long to wait after creating a version before
	// promoting it. Shared key state needs none: every plugin looks an
	// unknown key_id up once. Per-node state gives the operator's copy
	// time to land.
	PropagationWait time.Duration
	// Scope is where the encrypting provider keeps its key state. With
	// ScopePerNode and more than one apiserver (or an unknown number), a
	// new version is refused unless KeysetDistributed says the operator
	// keeps every node's copy the same.
	Scope             providers.Scope
	KeysetDistributed bool
	// ConfirmTimeout bounds the wait for each apiserver to switch.
	ConfirmTimeout time.Duration
	// ConfirmInterval is the pause between nudges.
	ConfirmInterval time.Duration
	// PassiveWait is waited instead of confirming when the apiservers
	// cannot be reached one by one (3 + N + M minutes).
	PassiveWait time.Duration
	// MaxPasses bounds the rewrite passes (default DefaultMaxPasses).
	MaxPasses int
	// Lock says how to take the rotation lease.
	Lock LockOptions
	// AfterPhase, when set, is called after each phase completes (tests use
	// it to crash a run at a chosen point).
	AfterPhase func(phase string)
}

// Rotation holds what a run talks to. Build it with New, or by hand in
// tests of the layer above.
type Rotation struct {
	Rotator providers.Rotator
	// DecryptOnly are the configured providers after the first, which
	// --retire empties and retires.
	DecryptOnly []DecryptOnly
	Kube        dynamic.Interface
	// Meta lists objects as metadata, to check an empty census against
	// the apiserver.
	Meta     metadata.Interface
	Rewriter *Rewriter
	// Engine, when set, rewrites instead of Rewriter (for example a
	// MigrationEngine); the census still decides what is left.
	Engine RewriteEngine
	Etcd   Etcd
	// Planner is the apiserver of the kubeconfig: the plan's canaries are
	// written through it.
	Planner *APIServer
	// APIServers are every apiserver, each confirmed on its own; empty
	// means they cannot be reached one by one.
	APIServers []*APIServer
	Logger     hclog.Logger
	// Out receives human progress messages (stderr).
	Out      io.Writer
	Progress *Progress
	Metrics  *Metrics
}

// Report is the outcome of one run (`kmsctl rotate -o json`).
type Report struct {
	Action Action `json:"action"`
	DryRun bool   `json:"dryRun,omitempty"`
	// OldKeyID is the primary before the run; NewKeyID after it.
	OldKeyID string `json:"oldKeyID"`
	NewKeyID string `json:"newKeyID"`
	// PrimaryAge is the age of the primary at planning time.
	PrimaryAge        Duration `json:"primaryAge"`
	PrimaryAgeSeconds float64  `json:"primaryAgeSeconds"`
	// Proof says what proved the etcd read is the apiserver's.
	Proof string `json:"proof,omitempty"`
	// Writers are how the apiserver writes each resource at the end of
	// the run: what the census judged against.
	Writers Writers `json:"writers,omitempty"`
	// LeaseTakenOver names a dead run whose lease this run took over.
	LeaseTakenOver string           `json:"leaseTakenOver,omitempty"`
	APIServers     []APIServerCheck `json:"apiservers,omitempty"`
	// PassiveWait is set when the apiservers could not be confirmed one by
	// one and the documented wait was used instead.
	PassiveWait        Duration                 `json:"passiveWait,omitempty"`
	PassiveWaitSeconds float64                  `json:"passiveWaitSeconds,omitempty"`
	Rewrite            map[string]*RewriteStats `json:"rewrite,omitempty"`
	Passes             int                      `json:"passes"`
	CensusBefore       *Census                  `json:"censusBefore,omitempty"`
	CensusAfter        *Census                  `json:"censusAfter,omitempty"`
	// Remaining is the number of objects not stored as the apiserver
	// writes now at the end (stale and undecodable).
	Remaining int `json:"remaining"`
	// Retired lists the versions disabled; RetireRefused says why none was.
	Retired       []string       `json:"retired,omitempty"`
	RetireRefused string         `json:"retireRefused,omitempty"`
	References    map[string]int `json:"references,omitempty"`
	// DecryptOnly is, with --retire, each provider after the first: how
	// many objects anywhere in etcd it still protects, and whether it can
	// be removed from the plugins' config.
	DecryptOnly     []DecryptOnlyReport `json:"decryptOnly,omitempty"`
	Phases          []PhaseTiming       `json:"phases"`
	Duration        Duration            `json:"duration"`
	DurationSeconds float64             `json:"durationSeconds"`
	// Error and ExitCode are set by the front end when the run failed.
	Error    string `json:"error,omitempty"`
	ExitCode int    `json:"exitCode"`
}

// PhaseTiming is how long one phase took.
type PhaseTiming struct {
	Phase    string   `json:"phase"`
	Duration Duration `json:"duration"`
	Seconds  float64  `json:"seconds"`
}

// DefaultMaxPasses bounds the rewrite passes of a run: later passes patch
// only what a census found still stale (an object a writer or a restarting
// apiserver kept from the pass before), so a few are cheap.
const DefaultMaxPasses = 5

// Run performs one rotation run. It always first finishes a rotation in
// progress (a target recorded in the lease, or objects not stored as the
// apiserver writes now), then rotates to a new version only with Force or
// when the primary is older than IfOlderThan. Every step is derived from
// observed state (the provider's versions, the lease, etcd), so running it
// again after a crash at any point finishes the job without redoing done
// work.
func (rot *Rotation) Run(ctx context.Context, opts Options) (*Report, error) {
	if opts.MaxPasses <= 0 {
		opts.MaxPasses = DefaultMaxPasses
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
	r := &runner{Rotation: rot, opts: opts, rep: &Report{DryRun: opts.DryRun}, started: time.Now()}
	defer func() {
		r.rep.Duration = Duration(time.Since(r.started))
		r.rep.DurationSeconds = r.rep.Duration.Seconds()
	}()
	return r.rep, r.run(ctx)
}

// run is the sequence of steps; each step returns what the next needs.
func (r *runner) run(ctx context.Context) error {
	p, err := r.plan(ctx)
	if err != nil {
		return err
	}
	if r.opts.DryRun {
		r.dryRun(p)
		return nil
	}
	lock, err := Acquire(ctx, r.Kube, r.opts.Lock)
	if err != nil {
		return err
	}
	r.rep.LeaseTakenOver = lock.TakenOver()
	ctx, release := lock.Hold(ctx)
	defer r.release(ctx, lock, release)
	err = r.underLease(ctx, lock, p)
	if ctx.Err() != nil {
		// The lease was lost (or the run was stopped): its cause, not
		// "context canceled", is what the user must read.
		if err == nil || errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
			return stoppedBy(ctx)
		}
		return errors.Join(stoppedBy(ctx), err)
	}
	return err
}

// underLease is the part of a run that writes: it runs only while the
// lease is held, and never retires once the run's context has ended.
func (r *runner) underLease(ctx context.Context, lock *Lock, p plan) error {
	g, err := r.decide(ctx, lock, p)
	if err != nil {
		return err
	}
	if err := r.switchTo(ctx, p, g); err != nil {
		return err
	}
	result := r.reencrypt(ctx, lock, p, g)
	if ctx.Err() != nil {
		return result
	}
	if r.opts.Retire {
		if err := r.retire(ctx, g.keyID); err != nil {
			return errors.Join(result, err)
		}
	}
	return result
}

// stoppedBy is why ctx ended: its cause (such as a lost lease), which
// ctx.Err() hides behind context.Canceled.
func stoppedBy(ctx context.Context) error {
	cause := context.Cause(ctx)
	if errors.Is(cause, ctx.Err()) {
		return cause
	}
	return fmt.Errorf("run stopped: %w", cause)
}

// release gives the lease back when the run ends, however it ends.
func (r *runner) release(ctx context.Context, lock *Lock, stopRenewing context.CancelFunc) {
	stopRenewing()
	rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
	defer cancel()
	if err := lock.Release(rctx); err != nil {
		r.Logger.Warn("release lease", "error", err)
	}
}

// runner is the state shared by the steps of one Run.
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
	d := Duration(time.Since(r.phaseAt))
	r.rep.Phases = append(r.rep.Phases, PhaseTiming{Phase: r.phase, Duration: d, Seconds: d.Seconds()})
	if r.opts.AfterPhase != nil {
		r.opts.AfterPhase(r.phase)
	}
}

func (r *runner) say(format string, args ...any) {
	if r.Out != nil {
		fmt.Fprintf(r.Out, format+"\n", args...)
	}
}

// sleep waits d or until ctx ends.
func sleep(ctx context.Context, d time.Duration) error {
	if d <= 0 {
		return ctx.Err()
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
