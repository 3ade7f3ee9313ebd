package rotation

import (
	"context"
	"fmt"
	"slices"
	"time"

	"github.com/kms-v2/kms-plugin/providers"
	"github.com/kms-v2/kms-plugin/rotation/etcdlayout"
)

// plan is what the plan step observed, before any change.
type plan struct {
	versions []providers.KeyVersion
	primary  providers.KeyVersion
	// writers are how the apiserver writes each resource, with the
	// primary as key_id.
	writers Writers
	// confirmWith is the canary resource that proves an apiserver's key
	// ("" when no canary resource is encrypted through the plugin).
	confirmWith string
	census      *Census
	due         due
}

// due is whether the flags ask for a new version, and why in words.
type due struct {
	rotate bool
	// young: --if-older-than found the primary younger (the run skips).
	young bool
	why   string
}

// plan reads the provider's versions, learns how the apiserver writes each
// resource (proving the etcd on the way), and takes the first census.
func (r *runner) plan(ctx context.Context) (plan, error) {
	r.begin(PhasePlan)
	defer r.end()
	var p plan
	var err error
	if p.versions, err = r.Rotator.Versions(ctx); err != nil {
		return p, fmt.Errorf("plan: list key versions: %w", err)
	}
	var ok bool
	if p.primary, ok = primaryOf(p.versions); !ok {
		return p, fmt.Errorf("plan: the provider has no primary key version; run `kmsctl keys init`")
	}
	r.rep.OldKeyID, r.rep.NewKeyID = p.primary.KeyID, p.primary.KeyID
	if !p.primary.Created.IsZero() {
		r.rep.PrimaryAge = Duration(time.Since(p.primary.Created))
		r.rep.PrimaryAgeSeconds = r.rep.PrimaryAge.Seconds()
	}
	r.say("plan: primary %s, %s old", p.primary.KeyID, ageString(p.primary.Created))
	for _, a := range r.APIServers {
		if err := a.Readyz(ctx); err != nil {
			r.say("plan: apiserver %s is not ready: %v", a.URL, err)
		}
	}
	if p.writers, p.confirmWith, err = r.learnWriters(ctx, p); err != nil {
		return p, fmt.Errorf("plan: %w", err)
	}
	r.rep.Writers = p.writers
	if p.census, err = r.census(ctx, p.writers); err != nil {
		return p, fmt.Errorf("plan: %w", err)
	}
	if err := CheckNotEmpty(ctx, r.Meta, p.census, r.opts.Resources); err != nil {
		return p, fmt.Errorf("plan: %w", err)
	}
	r.rep.CensusBefore = p.census
	p.due = r.due(p.primary)
	return p, nil
}

// census counts the rotated resources against w and reports it.
func (r *runner) census(ctx context.Context, w Writers) (*Census, error) {
	c, err := TakeCensus(ctx, r.Etcd, r.opts.Resources, w, CensusOptions{})
	if err != nil {
		return nil, err
	}
	r.Metrics.setCensus(c)
	r.say("census: %s", censusLine(c))
	return c, nil
}

// learnWriters finds how the apiserver writes each resource now: from a
// canary written through it and read back from etcd where one can be
// written (which also proves the etcd), else from the EncryptionConfiguration.
// Every resource must be written through a KMS v2 provider whose key the
// configured provider knows; anything else is refused, naming it.
func (r *runner) learnWriters(ctx context.Context, p plan) (Writers, string, error) {
	secrets, proof, err := r.Planner.Canary(ctx, r.Etcd, secretsResource)
	if err != nil {
		return nil, "", err
	}
	r.rep.Proof = proof
	r.say("plan: etcd proven: %s", proof)
	seen := map[string]etcdlayout.Writer{"secrets": secrets}
	w := Writers{}
	for _, res := range r.opts.Resources {
		got, err := r.writerOf(ctx, res, seen)
		if err != nil {
			return nil, "", err
		}
		if got.Encoding != etcdlayout.EncodingKMSv2 {
			return nil, "", fmt.Errorf("the apiserver writes %s as %s, not through this plugin: put the plugin first for %s in its EncryptionConfiguration and restart every apiserver before rotating", res.Name, got, res.Name)
		}
		if got.KeyID != "" && !slices.ContainsFunc(p.versions, func(v providers.KeyVersion) bool { return v.KeyID == got.KeyID }) {
			return nil, "", fmt.Errorf("the apiserver writes %s under key_id %s, which the provider in --config does not have: --config names another key provider than the apiserver's plugin", res.Name, got.KeyID)
		}
		got.KeyID = p.primary.KeyID
		w[res.Name] = got
		r.say("plan: the apiserver writes %s through kms:v2 provider %q", res.Name, got.Provider)
	}
	if err := r.Planner.DeleteCanaries(ctx); err != nil {
		r.Logger.Warn("delete plan canaries", "error", err)
	}
	for _, name := range []string{"secrets", "configmaps"} {
		if s, ok := seen[name]; ok && s.Encoding == etcdlayout.EncodingKMSv2 {
			return w, name, nil
		}
	}
	return w, "", nil
}

// writerOf learns one resource's writer, writing its canary when it has
// one (seen caches canaries already written this plan).
func (r *runner) writerOf(ctx context.Context, res Resource, seen map[string]etcdlayout.Writer) (etcdlayout.Writer, error) {
	cfg := r.opts.EncryptionConfig
	got, ok := seen[res.Name]
	if !ok && canaryResources[res.Name] {
		var err error
		if got, _, err = r.Planner.Canary(ctx, r.Etcd, res); err != nil {
			return got, err
		}
		seen[res.Name], ok = got, true
	}
	switch {
	case ok && cfg != nil:
		if want := cfg.WriterFor(res); want.Kind != got.Kind || want.Provider != got.Provider {
			return got, fmt.Errorf("the apiserver writes %s as %s, but %s says %s: give --encryption-config the file the apiserver uses", res.Name, got, cfg.Path, want)
		}
		return got, nil
	case ok:
		return got, nil
	case cfg != nil:
		return cfg.WriterFor(res), nil
	}
	return got, fmt.Errorf("cannot learn how the apiserver writes %s (no canary can be written for it): give --encryption-config, the EncryptionConfiguration the apiservers use", res.Name)
}

// due says whether the flags ask for a new version, and why in words.
func (r *runner) due(primary providers.KeyVersion) due {
	switch {
	case r.opts.Force:
		return due{rotate: true, why: "forced rotation (--force)"}
	case r.opts.IfOlderThan > 0 && primary.Created.IsZero():
		return due{young: true, why: "primary has no creation time; not rotating on age (use --force)"}
	case r.opts.IfOlderThan > 0 && time.Since(primary.Created) > r.opts.IfOlderThan:
		return due{rotate: true, why: fmt.Sprintf("primary is %s old, older than %s", ageString(primary.Created), r.opts.IfOlderThan)}
	case r.opts.IfOlderThan > 0:
		return due{young: true, why: fmt.Sprintf("primary is %s old, younger than %s: not rotating", ageString(primary.Created), r.opts.IfOlderThan)}
	}
	return due{why: "no new version asked for (--force or --if-older-than)"}
}

// dryRun reports what a run would do, having changed nothing.
func (r *runner) dryRun(p plan) {
	r.rep.Action = ActionDryRun
	r.rep.Remaining = p.census.NotCurrent()
	r.say("dry run: %s; %d objects not stored as the apiserver writes now; nothing changed", p.due.why, r.rep.Remaining)
}

func primaryOf(vs []providers.KeyVersion) (providers.KeyVersion, bool) {
	for _, v := range vs {
		if v.State == providers.StatePrimary {
			return v, true
		}
	}
	return providers.KeyVersion{}, false
}
