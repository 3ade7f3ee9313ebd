package main

import (
	"context"
	"encoding/json"
	"fmt"
	"log"
	"os/exec"
	"strings"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/kms-v2/kms-plugin/e2e/harness"
	"github.com/kms-v2/kms-plugin/rotation"
	"github.com/kms-v2/kms-plugin/rotation/etcdlayout"
)

// reads compares, at one size, `kmsctl census` of the secrets with a raw
// paginated etcd range read of the same prefix and page size, alternating
// them so both see the same machine.
type reads struct {
	objects int
	// census and raw are objects per second of each repetition; the
	// census's is its own scan time (its report's duration), which leaves
	// out the process start and the etcd proof.
	census, raw []float64
	// censusWall is the whole census process, proof included.
	censusWall []time.Duration
	rssKiB     int64 // highest peak RSS of the census processes
	anonKiB    int64 // highest peak anonymous RSS
}

func measureReads(ctx context.Context, c *harness.Cluster, kubeconfig string, reps int) (*reads, error) {
	r := &reads{}
	prefix := c.Layout.ResourcePrefix("secrets")
	for i := range reps {
		// The census first: its etcd proof may write its canary secret,
		// which the raw read then counts too.
		cs, res, err := runCensus(ctx, c, kubeconfig)
		if err != nil {
			return nil, err
		}
		n, rate, err := rawRead(ctx, c, prefix)
		if err != nil {
			return nil, err
		}
		r.raw = append(r.raw, rate)
		if cs.Total() != n {
			// Writers only update their own secrets, so both must count
			// the same objects; a difference means one read the wrong thing.
			return nil, fmt.Errorf("census counted %d secrets, the raw read %d under %s: they did not read the same thing", cs.Total(), n, prefix)
		}
		r.objects = n
		r.census = append(r.census, float64(n)/cs.DurationSeconds)
		r.censusWall = append(r.censusWall, res.wall)
		r.rssKiB, r.anonKiB = max(r.rssKiB, res.rssKiB[0]), max(r.anonKiB, res.anonKiB[0])
		log.Printf("reads %d/%d: %d secrets, census %.0f/s (scan %.2fs, process %s), raw etcd %.0f/s",
			i+1, reps, n, r.census[i], cs.DurationSeconds, res.wall.Round(10*time.Millisecond), rate)
	}
	return r, nil
}

// rawRead reads every key and value under prefix from etcd page by page,
// as the census does (over TLS with the same client certificate), and
// returns the count and objects per second.
func rawRead(ctx context.Context, c *harness.Cluster, prefix string) (int, float64, error) {
	tlsConfig, err := c.EtcdPKI.ClientTLS()
	if err != nil {
		return 0, 0, err
	}
	cli, err := clientv3.New(clientv3.Config{Endpoints: []string{c.Etcd.Endpoint}, DialTimeout: 5 * time.Second, TLS: tlsConfig})
	if err != nil {
		return 0, 0, err
	}
	defer cli.Close()
	end := clientv3.GetPrefixRangeEnd(prefix)
	// Connect first, as the census has before it scans.
	wctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	_, err = cli.Get(wctx, prefix, clientv3.WithRange(end), clientv3.WithLimit(1), clientv3.WithKeysOnly())
	cancel()
	if err != nil {
		return 0, 0, fmt.Errorf("raw range read of %s: %w", prefix, err)
	}
	from, n, start := prefix, 0, time.Now()
	for {
		pctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		resp, err := cli.Get(pctx, from, clientv3.WithRange(end), clientv3.WithLimit(etcdlayout.DefaultPageSize))
		cancel()
		if err != nil {
			return 0, 0, fmt.Errorf("raw range read of %s: %w", prefix, err)
		}
		n += len(resp.Kvs)
		if !resp.More || len(resp.Kvs) == 0 {
			break
		}
		from = string(resp.Kvs[len(resp.Kvs)-1].Key) + "\x00"
	}
	if n == 0 {
		return 0, 0, fmt.Errorf("raw range read of %s found nothing: wrong prefix or store", prefix)
	}
	return n, float64(n) / time.Since(start).Seconds(), nil
}

// runCensus runs `kmsctl census` of the secrets as the given kubeconfig's
// user, with its peak memory.
func runCensus(ctx context.Context, c *harness.Cluster, kubeconfig string) (*rotation.Census, *result, error) {
	args := append([]string{"census", "--config", c.KmsctlConfig(), "--kubeconfig", kubeconfig}, c.EtcdFlags()...)
	args = append(args, "--etcd-prefix", c.Layout.Prefix(), "--encryption-config", c.APIServers[0].EncryptionConfig, "--resources", "secrets", "-o", "json")
	cmd := exec.CommandContext(ctx, c.KmsctlPath(), args...)
	var stdout, stderr strings.Builder
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	start := time.Now()
	if err := cmd.Start(); err != nil {
		return nil, nil, err
	}
	anon := sampleAnon(cmd.Process.Pid)
	err := cmd.Wait()
	res := &result{name: "kmsctl census", wall: time.Since(start), anonKiB: []int64{anon.peak()}, rssKiB: []int64{maxRSS(cmd.ProcessState)}}
	if err != nil {
		return nil, nil, fmt.Errorf("kmsctl census: %w\n%s", err, stderr.String())
	}
	var cs rotation.Census
	if err := json.Unmarshal([]byte(stdout.String()), &cs); err != nil {
		return nil, nil, fmt.Errorf("kmsctl census output: %w", err)
	}
	return &cs, res, nil
}
