package tpmtest

import (
	"fmt"
	"runtime"
	"strings"
	"testing"
)

// TestStartNamesTheInstallCommand: with the tools missing, Start fails
// (never skips) and says how to install them.
func TestStartNamesTheInstallCommand(t *testing.T) {
	t.Setenv("PATH", t.TempDir())
	ft := &fatalTB{TB: t}
	done := make(chan struct{})
	go func() {
		defer close(done)
		Start(ft, "")
	}()
	<-done
	if !ft.failed || !strings.Contains(ft.msg, "apt-get install") || !strings.Contains(ft.msg, "swtpm") {
		t.Fatalf("Start without the tools: got failed=%v %q, want a failure naming apt-get install and swtpm", ft.failed, ft.msg)
	}
}

func TestProviderYAML(t *testing.T) {
	tp := TPM{Module: "/m.so", Label: "kms", PinFile: "/d/pin"}
	got := tp.ProviderYAML("k8s-kek")
	want := "pkcs11:\n  module: /m.so\n  tokenLabel: kms\n  pinFile: /d/pin\n  keyLabel: k8s-kek\n  algorithm: RSA-OAEP-256\n  keySize: 2048\n"
	if got != want {
		t.Fatalf("ProviderYAML: got %q, want %q", got, want)
	}
}

// fatalTB records a fatal failure and ends the goroutine, as testing.T
// does, without failing the real test.
type fatalTB struct {
	testing.TB
	failed bool
	msg    string
}

func (f *fatalTB) Fatalf(format string, args ...any) {
	f.failed, f.msg = true, fmt.Sprintf(format, args...)
	runtime.Goexit()
}

func (f *fatalTB) Fatal(args ...any) {
	f.failed, f.msg = true, strings.TrimSpace(fmt.Sprintln(args...))
	runtime.Goexit()
}
