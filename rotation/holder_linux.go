package rotation

import "syscall"

// signalZero asks the kernel whether pid exists without signalling it.
func signalZero(pid int) error { return syscall.Kill(pid, 0) }
