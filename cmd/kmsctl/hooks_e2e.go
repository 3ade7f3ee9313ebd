//go:build e2ehooks

package main

import (
	"context"
	"os"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/pflag"

	"github.com/kms-v2/kms-plugin/rotation"
)

// testHooks let the e2e tests crash a run at a chosen point. Only a kmsctl
// built with the e2ehooks tag has them; the shipped binary cannot be told
// to kill itself.
type testHooks struct {
	crashAfter string
}

func (h *testHooks) register(fs *pflag.FlagSet) {
	fs.StringVar(&h.crashAfter, "crash-after", "", "testing only: SIGKILL this process after the named phase, or after N rewritten objects (rewrite:N)")
}

// afterPhase kills the process hard after a phase, or once the rewrite has
// handled N objects ("rewrite:N"): what a node failure or OOM kill does.
func (h *testHooks) afterPhase(ctx context.Context, p *rotation.Progress) func(string) {
	if h.crashAfter == "" {
		return nil
	}
	kill := func() { _ = syscall.Kill(os.Getpid(), syscall.SIGKILL) }
	if n, ok := strings.CutPrefix(h.crashAfter, "rewrite:"); ok {
		limit, _ := strconv.ParseInt(n, 10, 64)
		go func() {
			for ctx.Err() == nil {
				if c := p.Count(); c >= limit && c > 0 {
					kill()
				}
				time.Sleep(5 * time.Millisecond)
			}
		}()
		return func(string) {}
	}
	return func(phase string) {
		if phase == h.crashAfter {
			kill()
		}
	}
}
