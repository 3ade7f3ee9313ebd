package tpmtest

import "syscall"

// sysProcAttr has the kernel kill a child if the test binary dies first
// (a -timeout panic, a SIGKILL), when no t.Cleanup runs, so a broken run
// cannot leave TPMs and buses behind.
func sysProcAttr() *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
}
