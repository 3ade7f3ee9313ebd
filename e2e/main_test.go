//go:build e2e

// Package e2e runs the plugin against a real kube-apiserver and etcd (see
// package harness): what the apiserver stores, how it reacts to plugin
// outages and key promotions, and how an HA pair shares state.
package e2e

import (
	"os"
	"testing"

	"github.com/kms-v2/kms-plugin/e2e/harness"
)

func TestMain(m *testing.M) { os.Exit(harness.RunTests(m)) }
