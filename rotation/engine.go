package rotation

import (
	"context"

	"github.com/kms-v2/kms-plugin/rotation/etcdlayout"
)

// RewriteEngine is the seam where a rewrite pass re-encrypts one resource.
// Everything around it (plan, confirm every apiserver, census, further
// passes, retire) stays the orchestrator's, whichever engine rewrites:
// kmsctl's own Rewriter (the default) or the platform's
// StorageVersionMigration (MigrationEngine).
type RewriteEngine interface {
	// Rewrite re-encrypts the stale objects of req.Resource and says what
	// it did. An engine may rewrite more than the stale objects.
	Rewrite(ctx context.Context, req RewriteRequest) (RewriteStats, error)
}

// RewriteRequest is one resource's share of a rewrite pass.
type RewriteRequest struct {
	Resource Resource
	// Listed says most objects are stale (right after a promote), so
	// listing them through the apiserver is cheaper than an etcd scan.
	Listed bool
	// Etcd and Writer find the stale objects: those not stored as Writer
	// writes. Writer names the key every object must end up under.
	Etcd   Etcd
	Writer etcdlayout.Writer
}

// Rewrite makes the Rewriter a RewriteEngine: it lists the resource when
// most objects are stale, and patches only what an etcd scan finds stale
// otherwise.
func (w *Rewriter) Rewrite(ctx context.Context, req RewriteRequest) (RewriteStats, error) {
	if req.Listed {
		return w.RewriteListed(ctx, req.Resource)
	}
	return w.RewriteStale(ctx, req.Resource, req.Etcd, req.Writer)
}

// engine is the configured RewriteEngine: Rotation.Engine, or the
// Rewriter when none is set.
func (r *runner) engine() RewriteEngine {
	if r.Engine != nil {
		return r.Engine
	}
	return r.Rewriter
}
