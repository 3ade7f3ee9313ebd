package main

import (
	"context"
	"os/exec"
	"time"
)

// neighbour is the "busy machine" of the benchmark: a process that keeps one
// core fully loaded for a whole round, as a build next to the control plane
// would. Its CPU time over its life is reported, so the report shows the core
// really was taken.
type neighbour struct {
	cmd   *exec.Cmd
	start time.Time
}

func startNeighbour(ctx context.Context) (*neighbour, error) {
	cmd := exec.CommandContext(ctx, "/bin/sh", "-c", "while :; do :; done")
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	return &neighbour{cmd: cmd, start: time.Now()}, nil
}

// stop ends the neighbour and returns the share of one core it used.
func (n *neighbour) stop() float64 {
	wall := time.Since(n.start)
	_ = n.cmd.Process.Kill()
	_ = n.cmd.Wait()
	return processCPU(n.cmd.ProcessState).Seconds() / wall.Seconds()
}
