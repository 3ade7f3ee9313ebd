package rotation

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"regexp"
	"strconv"
	"strings"
	"time"

	svmv1 "k8s.io/api/storagemigration/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/wait"
	svmclient "k8s.io/client-go/kubernetes/typed/storagemigration/v1"

	"github.com/kms-v2/kms-plugin/rotation/etcdlayout"
)

// Errors of the StorageVersionMigration engine.
var (
	// ErrMigrationFailed means a StorageVersionMigration ended Failed, or
	// was deleted before it ended. The run then counts what is left.
	ErrMigrationFailed = errors.New("StorageVersionMigration failed")
	// ErrMigrationStalled means a StorageVersionMigration did not change
	// for MigrationEngine.StallTimeout.
	ErrMigrationStalled = errors.New("StorageVersionMigration made no progress")
)

// Defaults of MigrationEngine.
const (
	// DefaultMigrationTimeout bounds how long a migration may go without a
	// change of its status. kube-controller-manager v1.37 writes the status
	// when it starts and ends a migration (and on transient errors), not per
	// object, so this is in effect a bound on one resource's migration: at
	// the 150 objects/s measured on a busy two-core machine, 30 minutes is
	// about 270,000 objects.
	DefaultMigrationTimeout = 30 * time.Minute
	// defaultMigrationPoll is the pause between two reads of a migration.
	defaultMigrationPoll = time.Second
	// defaultMigrationCall bounds each API call of the engine.
	defaultMigrationCall = 30 * time.Second
)

// MigrationEngine delegates the rewrite to the platform: one
// StorageVersionMigration (storagemigration.k8s.io/v1) per resource, which
// kube-controller-manager's storage-version-migrator-controller runs by
// patching every object, watched until it ends. Its name is derived from the
// resource and the target key, so a rerun finds it: a running one is
// adopted, an ended one (Failed, or Succeeded while objects are still stale)
// is deleted and created again.
type MigrationEngine struct {
	Client svmclient.StorageVersionMigrationsGetter
	// Progress, when set, shows the migrated objects the status reports.
	Progress *Progress
	// Out receives one line per change of a migration's conditions.
	Out io.Writer
	// StallTimeout stops the wait when a migration has not changed for
	// this long (default DefaultMigrationTimeout).
	StallTimeout time.Duration
	// PollInterval is the pause between reads (default 1 s).
	PollInterval time.Duration
	// CallTimeout bounds each API call (default 30 s).
	CallTimeout time.Duration
}

// MigrationName is the StorageVersionMigration that moves res to the key
// writer names: "kmsctl-rotate-<resource>-<10 hex digits of sha256 of the
// provider and key_id>", the same in every run towards that key.
func MigrationName(res Resource, writer etcdlayout.Writer) string {
	sum := sha256.Sum256([]byte(string(writer.Encoding) + "/" + writer.Provider + "/" + writer.KeyID))
	return "kmsctl-rotate-" + dnsLabel(res.Name) + "-" + hex.EncodeToString(sum[:5])
}

var notDNS = regexp.MustCompile(`[^a-z0-9.-]+`)

// dnsLabel makes a resource name fit an object name (a DNS subdomain),
// short enough to leave room for the rest of the name.
func dnsLabel(s string) string {
	s = strings.Trim(notDNS.ReplaceAllString(strings.ToLower(s), "-"), ".-")
	if len(s) > 200 {
		s = s[:200]
	}
	return s
}

// Rewrite runs the resource's migration to its end. A Failed or vanished
// migration wraps ErrMigrationFailed and names the migration and its
// condition; one without change for StallTimeout wraps ErrMigrationStalled.
func (m *MigrationEngine) Rewrite(ctx context.Context, req RewriteRequest) (RewriteStats, error) {
	start := time.Now()
	name := MigrationName(req.Resource, req.Writer)
	gr := metav1.GroupResource{Group: req.Resource.GVR.Group, Resource: req.Resource.GVR.Resource}
	err := m.ensure(ctx, name, gr)
	var st RewriteStats
	if err == nil {
		st, err = m.wait(ctx, name)
	}
	st.Resource = req.Resource.Name
	st.Duration = Duration(time.Since(start))
	st.DurationSeconds = st.Duration.Seconds()
	return st, err
}

// migrationState is what one read of a migration says.
type migrationState int

const (
	migrationPending migrationState = iota // created, not ended
	migrationSucceeded
	migrationFailed
)

// stateOf reads a migration's conditions.
func stateOf(svm *svmv1.StorageVersionMigration) migrationState {
	switch {
	case meta.IsStatusConditionTrue(svm.Status.Conditions, string(svmv1.MigrationFailed)):
		return migrationFailed
	case meta.IsStatusConditionTrue(svm.Status.Conditions, string(svmv1.MigrationSucceeded)):
		return migrationSucceeded
	}
	return migrationPending
}

// ensure makes a migration named name for gr exist and not be ended: it
// adopts a pending one and replaces an ended one.
func (m *MigrationEngine) ensure(ctx context.Context, name string, gr metav1.GroupResource) error {
	for range 3 {
		cur, err := m.get(ctx, name)
		switch {
		case apierrors.IsNotFound(err):
			err = m.create(ctx, name, gr)
			if apierrors.IsAlreadyExists(err) {
				continue // created meanwhile by another run: look again
			}
			return err
		case err != nil:
			return fmt.Errorf("read StorageVersionMigration %s: %w", name, err)
		case stateOf(cur) == migrationPending:
			m.say("rewrite %s: adopting StorageVersionMigration %s, still running from an earlier run", gr.String(), name)
			return nil
		}
		m.say("rewrite %s: StorageVersionMigration %s ended %s in an earlier run; replacing it", gr.String(), name, conditionLine(cur))
		if err := m.remove(ctx, cur); err != nil {
			return err
		}
	}
	return fmt.Errorf("StorageVersionMigration %s: created and deleted by someone else meanwhile; rerun", name)
}

// create creates the migration.
func (m *MigrationEngine) create(ctx context.Context, name string, gr metav1.GroupResource) error {
	ctx, cancel := context.WithTimeout(ctx, m.callTimeout())
	defer cancel()
	svm := &svmv1.StorageVersionMigration{
		ObjectMeta: metav1.ObjectMeta{Name: name, Labels: map[string]string{"app.kubernetes.io/managed-by": "kmsctl"}},
		Spec:       svmv1.StorageVersionMigrationSpec{Resource: gr},
	}
	_, err := m.Client.StorageVersionMigrations().Create(ctx, svm, metav1.CreateOptions{})
	if err != nil && !apierrors.IsAlreadyExists(err) {
		return fmt.Errorf("create StorageVersionMigration %s: %w", name, err)
	}
	if err == nil {
		m.say("rewrite %s: created StorageVersionMigration %s", gr.String(), name)
	}
	return err
}

// remove deletes an ended migration (only that one, by UID) and waits
// until it is gone, so that the new one is not mistaken for it.
func (m *MigrationEngine) remove(ctx context.Context, svm *svmv1.StorageVersionMigration) error {
	dctx, cancel := context.WithTimeout(ctx, m.callTimeout())
	err := m.Client.StorageVersionMigrations().Delete(dctx, svm.Name, metav1.DeleteOptions{Preconditions: &metav1.Preconditions{UID: &svm.UID}})
	cancel()
	if err != nil && !apierrors.IsNotFound(err) && !apierrors.IsConflict(err) {
		return fmt.Errorf("delete StorageVersionMigration %s: %w", svm.Name, err)
	}
	wctx, cancel := context.WithTimeout(ctx, m.callTimeout())
	defer cancel()
	err = wait.PollUntilContextCancel(wctx, m.pollInterval(), true, func(ctx context.Context) (bool, error) {
		cur, err := m.get(ctx, svm.Name)
		if apierrors.IsNotFound(err) || (err == nil && cur.UID != svm.UID) {
			return true, nil
		}
		return false, nil
	})
	if err != nil {
		return fmt.Errorf("StorageVersionMigration %s: still there after deleting it: %w", svm.Name, err)
	}
	return nil
}

// wait polls the migration until it ends, is deleted, or has not changed
// for StallTimeout. Read errors are retried until then: they are the
// apiserver's trouble, not the migration's.
func (m *MigrationEngine) wait(ctx context.Context, name string) (RewriteStats, error) {
	w := migrationWatch{name: name, changed: time.Now()}
	var st RewriteStats
	err := wait.PollUntilContextCancel(ctx, m.pollInterval(), true, func(ctx context.Context) (bool, error) {
		cur, err := m.get(ctx, name)
		switch {
		case apierrors.IsNotFound(err):
			return false, fmt.Errorf("StorageVersionMigration %s was deleted before it ended: %w", name, ErrMigrationFailed)
		case err != nil:
			w.lastErr = err
		default:
			w.observe(cur, m)
			switch stateOf(cur) {
			case migrationSucceeded:
				st.Visited, st.Rewritten = w.total, w.total
				return true, nil
			case migrationFailed:
				return false, fmt.Errorf("StorageVersionMigration %s: %s: %w", name, conditionLine(cur), ErrMigrationFailed)
			}
		}
		if idle := time.Since(w.changed); idle > m.stallTimeout() {
			return false, w.stalled(idle)
		}
		return false, nil
	})
	return st, err
}

// migrationWatch is what the wait remembers of one migration between reads.
type migrationWatch struct {
	name    string
	rv      string    // resourceVersion of the last read
	changed time.Time // when rv last changed
	conds   string    // conditionLine of the last read
	done    int64     // migrated objects reported so far
	total   int64
	lastErr error
}

// observe notes a read: a new resourceVersion is progress, a new condition
// is said, and the status's object counts move the progress line.
func (w *migrationWatch) observe(svm *svmv1.StorageVersionMigration, m *MigrationEngine) {
	if svm.ResourceVersion != w.rv {
		w.rv, w.changed = svm.ResourceVersion, time.Now()
	}
	if line := conditionLine(svm); line != w.conds {
		w.conds = line
		m.say("rewrite: StorageVersionMigration %s: %s", w.name, line)
	}
	done, total, ok := migratedCount(svm)
	if ok && done > w.done {
		m.Progress.Done(done - w.done)
		w.done, w.total = done, total
	}
}

// stalled is the error of a migration that did not change for idle.
func (w *migrationWatch) stalled(idle time.Duration) error {
	why := "is kube-controller-manager running its storage-version-migrator-controller?"
	if w.lastErr != nil {
		why = "last read: " + w.lastErr.Error()
	}
	state := w.conds
	if state == "" {
		state = "no conditions yet"
	}
	return fmt.Errorf("StorageVersionMigration %s unchanged for %s (%s); %s: %w", w.name, idle.Round(time.Second), state, why, ErrMigrationStalled)
}

// conditionLine is the true conditions of a migration in one line, e.g.
// "Failed (StorageVersionMigrationFailed: ...)".
func conditionLine(svm *svmv1.StorageVersionMigration) string {
	var parts []string
	for _, c := range svm.Status.Conditions {
		if c.Status != metav1.ConditionTrue {
			continue
		}
		p := c.Type
		if c.Reason != "" || c.Message != "" {
			p += " (" + strings.TrimSpace(c.Reason+": "+oneLine(c.Message)) + ")"
		}
		parts = append(parts, p)
	}
	if len(parts) == 0 {
		return "no conditions yet"
	}
	return strings.Join(parts, ", ")
}

// oneLine keeps a status message on one line.
func oneLine(s string) string { return strings.Join(strings.Fields(s), " ") }

var (
	notYetMigrated = regexp.MustCompile(`(\d+)/(\d+) objects not yet migrated`)
	verified       = regexp.MustCompile(`(\d+) objects verified migrated`)
)

// migratedCount reads the object counts kube-controller-manager writes in
// the Running condition's message ("N/M objects not yet migrated", "M
// objects verified migrated"); ok is false when there are none.
func migratedCount(svm *svmv1.StorageVersionMigration) (done, total int64, ok bool) {
	c := meta.FindStatusCondition(svm.Status.Conditions, string(svmv1.MigrationRunning))
	if c == nil {
		return 0, 0, false
	}
	if m := verified.FindStringSubmatch(c.Message); m != nil {
		t, _ := strconv.ParseInt(m[1], 10, 64)
		return t, t, true
	}
	if m := notYetMigrated.FindStringSubmatch(c.Message); m != nil {
		left, _ := strconv.ParseInt(m[1], 10, 64)
		t, _ := strconv.ParseInt(m[2], 10, 64)
		return t - left, t, true
	}
	return 0, 0, false
}

// get reads a migration within CallTimeout.
func (m *MigrationEngine) get(ctx context.Context, name string) (*svmv1.StorageVersionMigration, error) {
	ctx, cancel := context.WithTimeout(ctx, m.callTimeout())
	defer cancel()
	return m.Client.StorageVersionMigrations().Get(ctx, name, metav1.GetOptions{})
}

func (m *MigrationEngine) say(format string, args ...any) {
	if m.Out != nil {
		fmt.Fprintf(m.Out, format+"\n", args...)
	}
}

func (m *MigrationEngine) stallTimeout() time.Duration {
	if m.StallTimeout > 0 {
		return m.StallTimeout
	}
	return DefaultMigrationTimeout
}

func (m *MigrationEngine) pollInterval() time.Duration {
	if m.PollInterval > 0 {
		return m.PollInterval
	}
	return defaultMigrationPoll
}

func (m *MigrationEngine) callTimeout() time.Duration {
	if m.CallTimeout > 0 {
		return m.CallTimeout
	}
	return defaultMigrationCall
}

// afterFailedPass ends a run whose rewrite pass failed. A failed migration
// is the platform's verdict on one resource, not a broken run: a census
// then says whether objects remain (ErrObjectsRemain, exit 2, the error
// naming the migration and its condition) or whether the failure came
// after everything was rewritten. Any other error ends the run as it is.
func (r *runner) afterFailedPass(ctx context.Context, lock *Lock, w Writers, err error) error {
	if !errors.Is(err, ErrMigrationFailed) {
		return err
	}
	r.begin(PhaseCensus)
	c, cerr := r.census(ctx, w)
	if cerr != nil {
		return errors.Join(err, cerr)
	}
	r.rep.CensusAfter, r.rep.Remaining = c, c.NotCurrent()
	r.end()
	if r.rep.Remaining > 0 {
		return fmt.Errorf("%w; %d objects still not stored as the apiserver writes now: %w", err, r.rep.Remaining, ErrObjectsRemain)
	}
	r.say("%v; the census finds nothing left", err)
	return r.settle(ctx, lock)
}
