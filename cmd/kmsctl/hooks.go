//go:build !e2ehooks

package main

import (
	"context"

	"github.com/spf13/pflag"

	"github.com/kms-v2/kms-plugin/rotation"
)

// testHooks are empty in the shipped binary: the crash hooks the e2e tests
// use exist only in a build with the e2ehooks tag (hooks_e2e.go).
type testHooks struct{}

func (testHooks) register(*pflag.FlagSet) {}

func (testHooks) afterPhase(context.Context, *rotation.Progress) func(string) { return nil }
