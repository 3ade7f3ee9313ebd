package harness

import "syscall"

// sysProcAttr makes the kernel kill a child when the harness dies, so a
// crashed or killed test never leaves an apiserver or etcd behind.
func sysProcAttr() *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
}
