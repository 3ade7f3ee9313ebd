package main

import (
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"time"
)

// anonSampler follows a running process's anonymous (private) resident
// memory, which is what grows with work; maxrss also counts the pages of the
// mapped executable.
type anonSampler struct {
	stop chan struct{}
	done chan int64
}

func sampleAnon(pid int) *anonSampler {
	s := &anonSampler{stop: make(chan struct{}), done: make(chan int64, 1)}
	go func() {
		var peak int64
		t := time.NewTicker(20 * time.Millisecond)
		defer t.Stop()
		for {
			if b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid)); err == nil {
				for _, line := range strings.Split(string(b), "\n") {
					if v, ok := strings.CutPrefix(line, "RssAnon:"); ok {
						var kib int64
						fmt.Sscanf(strings.TrimSpace(v), "%d", &kib)
						peak = max(peak, kib)
					}
				}
			}
			select {
			case <-s.stop:
				s.done <- peak
				return
			case <-t.C:
			}
		}
	}()
	return s
}

func (s *anonSampler) peak() int64 {
	close(s.stop)
	return <-s.done
}

// maxRSS is the process's peak resident set in KiB (Linux reports KiB).
func maxRSS(ps *os.ProcessState) int64 {
	if ps == nil {
		return 0
	}
	if ru, ok := ps.SysUsage().(*syscall.Rusage); ok {
		return int64(ru.Maxrss)
	}
	return 0
}

func mib(kib int64) string { return fmt.Sprintf("%.1f MiB", float64(kib)/1024) }

// controlPlaneProcs are the harness's long-running processes (etcd,
// kube-apiserver, kms-plugin), found by their arguments naming the
// cluster's folder.
type controlPlaneProcs map[string]int

func controlPlane(dir string) controlPlaneProcs {
	out := controlPlaneProcs{}
	entries, _ := os.ReadDir("/proc")
	for _, e := range entries {
		var pid int
		if _, err := fmt.Sscanf(e.Name(), "%d", &pid); err != nil || pid == os.Getpid() {
			continue
		}
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
		if err != nil || !strings.Contains(string(b), dir) {
			continue
		}
		args := strings.Split(string(b), "\x00")
		out[filepath.Base(args[0])] = pid
	}
	return out
}

// cpuSnapshot is the CPU time of each control-plane process at one moment.
type cpuSnapshot struct {
	procs controlPlaneProcs
	at    map[string]time.Duration
}

func (p controlPlaneProcs) cpu() cpuSnapshot {
	s := cpuSnapshot{procs: p, at: map[string]time.Duration{}}
	for name, pid := range p {
		s.at[name] = procCPU(pid)
	}
	return s
}

// since returns the CPU time each process used after the snapshot.
func (s cpuSnapshot) since() map[string]time.Duration {
	out := map[string]time.Duration{}
	for name, pid := range s.procs {
		out[name] = procCPU(pid) - s.at[name]
	}
	return out
}

// procCPU reads utime+stime of a running process from /proc/<pid>/stat.
func procCPU(pid int) time.Duration {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0
	}
	// Fields after the command name, which is in parentheses and may
	// contain spaces: state is field 3, utime 14, stime 15.
	f := strings.Fields(string(b[strings.LastIndexByte(string(b), ')')+1:]))
	if len(f) < 13 {
		return 0
	}
	var ut, st int64
	fmt.Sscanf(f[11], "%d", &ut)
	fmt.Sscanf(f[12], "%d", &st)
	return time.Duration(ut+st) * time.Second / 100 // USER_HZ is 100 on Linux
}

// processCPU is the user+system time of an exited process.
func processCPU(ps *os.ProcessState) time.Duration {
	if ps == nil {
		return 0
	}
	return ps.UserTime() + ps.SystemTime()
}

func cpuLine(m map[string]time.Duration) string {
	var names []string
	for k := range m {
		names = append(names, k)
	}
	sort.Strings(names)
	var parts []string
	for _, k := range names {
		parts = append(parts, fmt.Sprintf("%s %.1fs", k, m[k].Seconds()))
	}
	return "CPU " + strings.Join(parts, ", ")
}
