package plugin

import (
	"strconv"
	"sync/atomic"
	"unicode/utf8"

	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/time/rate"
	"google.golang.org/grpc/codes"
)

// Request log budgets. A client can send bad requests as fast as it likes,
// and each one used to write a WARN line; these bound what that costs in
// disk and in the node's log pipeline. Lines over a budget are dropped,
// counted in kms_plugin_log_lines_dropped_total{reason="rate_limited"},
// and the next line written says how many of its kind went before it.
const (
	// clientLogRate and clientLogBurst bound lines about requests that
	// were themselves at fault (see clientCaused): 5 a second after a
	// burst of 20, about 1.5 KB/s at the longest line.
	clientLogRate  = 5
	clientLogBurst = 20
	// failureLogRate and failureLogBurst bound lines about the plugin's or
	// its backend's failures (Unavailable, Internal, ...), and panics. An
	// operator needs these, so they have their own, larger budget that a
	// flood of bad requests cannot spend; but every request failing during
	// a backend outage must not become a line each either. The background
	// check logs the outage itself once, when it starts and ends.
	failureLogRate  = 10
	failureLogBurst = 50
)

// logClip is how many bytes of a client-chosen string (the uid, an
// oversized key_id) a log line carries.
const logClip = 64

// logBudget rate-limits one kind of log line. It is safe for concurrent
// use.
type logBudget struct {
	lim     *rate.Limiter
	dropped prometheus.Counter
	// pending counts lines dropped since the last one written.
	pending atomic.Int64
}

func newLogBudget(perSecond float64, burst int, dropped prometheus.Counter) *logBudget {
	return &logBudget{lim: rate.NewLimiter(rate.Limit(perSecond), burst), dropped: dropped}
}

// take reports whether a line may be written now and, when it may, how
// many lines of its kind were dropped before it.
func (b *logBudget) take() (ok bool, droppedBefore int64) {
	if !b.lim.Allow() {
		b.pending.Add(1)
		b.dropped.Inc()
		return false, 0
	}
	return true, b.pending.Swap(0)
}

// clientCaused reports whether a gRPC code means the request itself was at
// fault: malformed or oversized, a key_id no provider owns, a disabled
// key, a client that gave up. Such lines share the small client budget.
// Every other code (Unavailable, Internal, PermissionDenied,
// DeadlineExceeded, Unknown) is a failure of the plugin or its backend.
func clientCaused(c codes.Code) bool {
	switch c {
	case codes.InvalidArgument, codes.NotFound, codes.FailedPrecondition, codes.ResourceExhausted,
		codes.OutOfRange, codes.Unimplemented, codes.Canceled, codes.AlreadyExists, codes.Unauthenticated:
		return true
	}
	return false
}

// clip returns s whole when it is at most n bytes, else its first n bytes
// (cut back to a UTF-8 boundary) and the original length:
// "abc…(3145728 bytes)". A client decides how long a uid is; the log line
// must not.
func clip(s string, n int) string {
	if len(s) <= n {
		return s
	}
	cut := n
	for cut > 0 && !utf8.RuneStart(s[cut]) {
		cut--
	}
	return s[:cut] + "…(" + strconv.Itoa(len(s)) + " bytes)"
}
