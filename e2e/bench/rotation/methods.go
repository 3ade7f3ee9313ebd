package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"github.com/kms-v2/kms-plugin/e2e/harness"
	"github.com/kms-v2/kms-plugin/rotation"
)

// result is one method's measurement.
type result struct {
	method  string // methodKmsctl, methodSVM, ...
	cond    string // conditionQuiet or conditionBusy
	objects int    // bench secrets stored during the run
	name    string
	wall    time.Duration
	rssKiB  []int64 // peak RSS per process
	anonKiB []int64 // peak anonymous RSS per process
	writers *window
	note    string
	report  *rotation.Report
	ps      *os.ProcessState
	round   int
	// cpu is the CPU time each control-plane process and the method's own
	// processes used while it ran: on two shared cores it shows where the
	// capacity went.
	cpu map[string]time.Duration
}

// runKmsctl times `kmsctl rotate` finishing the rotation to the promoted
// key, as the kubeconfig's user, with extra flags (or NAME=value
// environment for kmsctl alone).
func runKmsctl(ctx context.Context, c *harness.Cluster, kubeconfig string, extra []string, profile string) (*result, error) {
	args := append([]string{"rotate", "--config", c.KmsctlConfig(), "--kubeconfig", kubeconfig}, c.EtcdFlags()...)
	args = append(args, "--apiservers", c.APIServers[0].URL, "--resources", "secrets", "-o", "json")
	if profile != "" {
		if err := os.MkdirAll(filepath.Dir(profile), 0o755); err != nil {
			return nil, err
		}
		args = append(args, "--cpu-profile", profile+"-kmsctl.pprof")
	}
	var env []string
	for _, a := range extra {
		// NAME=value (an upper-case name) is kmsctl's environment, e.g.
		// GOMEMLIMIT=16MiB, so only kmsctl sees it, not the control plane.
		if name, _, ok := strings.Cut(a, "="); ok && name == strings.ToUpper(name) && !strings.HasPrefix(name, "-") {
			env = append(env, a)
		} else {
			args = append(args, a)
		}
	}
	cmd := exec.CommandContext(ctx, c.KmsctlPath(), args...)
	cmd.Env = append(os.Environ(), env...)
	var stdout, stderr strings.Builder
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	log.Printf("kmsctl rotate %s", strings.Join(extra, " "))
	start := time.Now()
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	anon := sampleAnon(cmd.Process.Pid)
	if profile != "" {
		go profileAPIServer(ctx, c, profile+"-kube-apiserver.pprof")
	}
	err := cmd.Wait()
	wall := time.Since(start)
	anonPeak := anon.peak()
	if err != nil {
		return nil, fmt.Errorf("kmsctl rotate: %w\n%s", err, lastLines(stderr.String(), 20))
	}
	var rep rotation.Report
	if err := json.Unmarshal([]byte(stdout.String()), &rep); err != nil {
		return nil, err
	}
	note := fmt.Sprintf("action %s, %d passes, remaining %d", rep.Action, rep.Passes, rep.Remaining)
	if st := rep.Rewrite["secrets"]; st != nil {
		note += fmt.Sprintf(", %d rewritten, %d unchanged, %d conflicts, %d errors", st.Rewritten, st.Unchanged, st.Conflicts, st.Errors)
	}
	name := "kmsctl rotate"
	if len(extra) > 0 {
		name += " " + strings.Join(extra, " ")
	}
	return &result{name: name, wall: wall, rssKiB: []int64{maxRSS(cmd.ProcessState)}, anonKiB: []int64{anonPeak}, note: note, report: &rep, ps: cmd.ProcessState}, nil
}

func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	return strings.Join(lines[max(0, len(lines)-n):], "\n")
}

// profileAPIServer saves a CPU profile of kube-apiserver over the first
// seconds of a kmsctl run (its /debug/pprof, admin token).
func profileAPIServer(ctx context.Context, c *harness.Cluster, path string) {
	code, body, err := c.APIServers[0].Get(ctx, "/debug/pprof/profile?seconds=5")
	if err != nil || code != 200 {
		log.Printf("kube-apiserver profile: %d %v", code, err)
		return
	}
	if err := os.WriteFile(path, []byte(body), 0o644); err != nil {
		log.Printf("kube-apiserver profile: %v", err)
	}
}

// runKubectl times `kubectl get secrets -A -o json | kubectl replace -f -`,
// with both processes started here so each one's peak RSS is known.
func runKubectl(ctx context.Context, c *harness.Cluster) (*result, error) {
	kc := c.APIServers[0].Kubeconfig
	get := exec.CommandContext(ctx, c.KubectlPath(), "--kubeconfig", kc, "get", "secrets", "-A", "-o", "json")
	replace := exec.CommandContext(ctx, c.KubectlPath(), "--kubeconfig", kc, "replace", "-f", "-")
	pr, pw, err := os.Pipe()
	if err != nil {
		return nil, err
	}
	get.Stdout, get.Stderr = pw, os.Stderr
	replace.Stdin, replace.Stdout = pr, io.Discard
	var stderr strings.Builder
	replace.Stderr = &stderr
	log.Printf("kubectl get secrets -A -o json | kubectl replace -f -")
	start := time.Now()
	if err := replace.Start(); err != nil {
		return nil, err
	}
	if err := get.Start(); err != nil {
		return nil, err
	}
	anonReplace, anonGet := sampleAnon(replace.Process.Pid), sampleAnon(get.Process.Pid)
	pw.Close()
	pr.Close()
	gerr := get.Wait()
	getPeak := anonGet.peak()
	rerr := replace.Wait()
	wall := time.Since(start)
	replacePeak := anonReplace.peak()
	note := "exit ok"
	if gerr != nil || rerr != nil {
		msg := strings.TrimSpace(stderr.String())
		if len(msg) > 300 {
			msg = msg[:300] + "..."
		}
		note = fmt.Sprintf("get: %v, replace: %v (%s)", gerr, rerr, msg)
	}
	cpu := map[string]time.Duration{"kubectl": processCPU(get.ProcessState) + processCPU(replace.ProcessState)}
	return &result{name: "kubectl get | kubectl replace", wall: wall, cpu: cpu,
		rssKiB: []int64{maxRSS(get.ProcessState), maxRSS(replace.ProcessState)}, anonKiB: []int64{getPeak, replacePeak}, note: note}, nil
}
