//go:build !linux

package harness

import "syscall"

// sysProcAttr: only Linux can tie a child's life to its parent; elsewhere
// Close is the only cleanup.
func sysProcAttr() *syscall.SysProcAttr { return nil }
