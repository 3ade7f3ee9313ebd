package rotation

import (
	"fmt"
	"io"
	"sync"
	"sync/atomic"
	"time"
)

// Progress prints "done/total, rate, ETA" lines for the running phase to a
// writer (stderr for the CLI) at a fixed interval. Safe for concurrent use;
// a nil *Progress does nothing.
type Progress struct {
	out      io.Writer
	interval time.Duration
	limiter  *Limiter

	done  atomic.Int64
	mu    sync.Mutex
	label string
	// paced says the limiter paces the running phase, so its figures
	// belong on the line; another engine (StorageVersionMigration) is not.
	paced bool
	total int64
	start time.Time
	stop  chan struct{}
	wg    sync.WaitGroup
}

// NewProgress returns a Progress that writes to out every interval; a nil
// out makes every method a no-op apart from counting.
func NewProgress(out io.Writer, interval time.Duration, l *Limiter) *Progress {
	if interval <= 0 {
		interval = 2 * time.Second
	}
	return &Progress{out: out, interval: interval, limiter: l}
}

// Begin starts reporting a phase with an expected total (0 if unknown),
// with the limiter's figures on each line.
func (p *Progress) Begin(label string, total int64) { p.BeginPaced(label, total, true) }

// BeginPaced is Begin for a phase the limiter may not pace: paced false
// leaves its concurrency and latency off the lines.
func (p *Progress) BeginPaced(label string, total int64, paced bool) {
	if p == nil {
		return
	}
	p.End()
	p.mu.Lock()
	p.label, p.total, p.start, p.paced = label, total, time.Now(), paced
	p.done.Store(0)
	p.stop = make(chan struct{})
	stop := p.stop
	p.mu.Unlock()
	if p.out == nil {
		return
	}
	p.wg.Add(1)
	go func() {
		defer p.wg.Done()
		t := time.NewTicker(p.interval)
		defer t.Stop()
		for {
			select {
			case <-stop:
				return
			case <-t.C:
				p.print(false)
			}
		}
	}()
}

// Done counts n objects handled.
func (p *Progress) Done(n int64) {
	if p != nil {
		p.done.Add(n)
	}
}

// Count is the number of objects done in the current phase.
func (p *Progress) Count() int64 {
	if p == nil {
		return 0
	}
	return p.done.Load()
}

// End stops the phase's ticker and prints its final line.
func (p *Progress) End() {
	if p == nil {
		return
	}
	p.mu.Lock()
	stop := p.stop
	p.stop = nil
	p.mu.Unlock()
	if stop == nil {
		return
	}
	close(stop)
	p.wg.Wait()
	p.print(true)
}

func (p *Progress) print(final bool) {
	if p.out == nil {
		return
	}
	p.mu.Lock()
	label, total, start, paced := p.label, p.total, p.start, p.paced
	p.mu.Unlock()
	done := p.done.Load()
	el := time.Since(start)
	rate := float64(done) / max(el.Seconds(), 1e-3)
	line := fmt.Sprintf("%s: %d", label, done)
	if total > 0 {
		line += fmt.Sprintf("/%d (%.0f%%)", total, 100*float64(done)/float64(total))
	}
	line += fmt.Sprintf(", %.0f/s", rate)
	if total > done && rate > 0 && !final {
		line += fmt.Sprintf(", ETA %s", time.Duration(float64(total-done)/rate*float64(time.Second)).Round(time.Second))
	}
	if final {
		line += fmt.Sprintf(", took %s", el.Round(time.Millisecond))
	}
	if p.limiter != nil && paced {
		s := p.limiter.Stats()
		line += fmt.Sprintf(", concurrency %d, latency %s (baseline %s)", s.Limit, s.Latency.Round(time.Millisecond), s.Baseline.Round(time.Millisecond))
		if s.Throttled > 0 {
			line += fmt.Sprintf(", throttled %d", s.Throttled)
		}
	}
	fmt.Fprintln(p.out, line)
}
