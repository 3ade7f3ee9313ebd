package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/spf13/cobra"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	apiserverv1 "k8s.io/apiserver/pkg/apis/apiserver/v1"
	kmsapi "k8s.io/kms/apis/v2"
	"sigs.k8s.io/yaml"

	"github.com/kms-v2/kms-plugin/cmd/internal/backends"
	"github.com/kms-v2/kms-plugin/config"
	"github.com/kms-v2/kms-plugin/plugin"
	"github.com/kms-v2/kms-plugin/providers"
)

// Deadlines of the doctor's calls: nothing it does may hang.
const (
	// providerTimeout bounds opening one provider and its round trip (a
	// remote vault or a slow HSM login).
	providerTimeout = 30 * time.Second
	// statusTimeout bounds the Status call to a running plugin; the
	// apiserver's own default for a KMS call is 3 s.
	statusTimeout = 3 * time.Second
	// healthTimeout bounds GET /readyz.
	healthTimeout = 2 * time.Second
	// maxAPIServerTimeout is the longest EncryptionConfiguration timeout
	// doctor accepts without a warning: the apiserver's default, past
	// which a hung plugin holds every write of an encrypted resource.
	maxAPIServerTimeout = 3 * time.Second
)

// ErrChecksFailed is returned when any check reports fail.
var ErrChecksFailed = errors.New("doctor: checks failed")

// level is a check's outcome.
type level string

const (
	levelOK   level = "ok"
	levelWarn level = "warn"
	levelFail level = "fail"
)

// report prints each check as one line and counts failures.
type report struct {
	w     io.Writer
	fails int
}

func (r *report) add(l level, check, format string, args ...any) {
	if l == levelFail {
		r.fails++
	}
	// Details come from errors that may span lines; a check is one line.
	detail := strings.Join(strings.Fields(fmt.Sprintf(format, args...)), " ")
	fmt.Fprintf(r.w, "%s %s: %s\n", l, check, detail)
}

func doctorCommand() *cobra.Command {
	var configPath, encConfig string
	cmd := &cobra.Command{
		Use:   "doctor --config FILE [--encryption-config FILE]",
		Short: "Check this node's plugin setup before the apiserver finds out what is wrong",
		Long: `doctor checks, on the node, what kms-plugin serve and kube-apiserver will
depend on: the config parses; every provider opens and its primary key
encrypts and decrypts random bytes (secret files pass the trust rules on
the way); the socket folder is acceptable and, when the plugin runs, its
Status is healthy; the health endpoint answers /readyz; and, with
--encryption-config, that the apiserver's EncryptionConfiguration points at
this socket. One line per check, "ok|warn|fail CHECK: DETAIL"; the exit
code is 1 when any check fails. Run it as the plugin's user, so the file
checks are the plugin's.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if configPath == "" {
				return errors.New("--config is required: the plugin configuration file")
			}
			r := &report{w: cmd.OutOrStdout()}
			doctor(cmd.Context(), r, configPath, encConfig)
			if r.fails > 0 {
				return fmt.Errorf("%w (%d); fix each fail line above", ErrChecksFailed, r.fails)
			}
			return nil
		},
	}
	cmd.Flags().StringVar(&configPath, "config", "", "plugin configuration `FILE` (YAML)")
	cmd.Flags().StringVar(&encConfig, "encryption-config", "", "the apiserver's EncryptionConfiguration `FILE` (--encryption-provider-config), to check it points at this plugin")
	return cmd
}

func doctor(ctx context.Context, r *report, configPath, encConfig string) {
	cfg, err := backends.Load(configPath)
	if err != nil {
		r.add(levelFail, "config", "%v", err)
		if encConfig != "" {
			r.add(levelWarn, "encryption-config", "not checked: the plugin config does not load")
		}
		return
	}
	r.add(levelOK, "config", "%s loads; %d provider(s), socket %s", configPath, len(cfg.Providers), cfg.Socket)

	var primary string
	for i, e := range cfg.Providers {
		kid, ok := checkProvider(ctx, r, e)
		if i == 0 && ok {
			primary = kid
		}
	}
	running := checkSocket(ctx, r, cfg, primary)
	checkHealth(ctx, r, cfg.Health, running)
	if encConfig != "" {
		checkEncryptionConfig(r, encConfig, cfg.Socket)
	}
}

// checkProvider opens one provider, as serve does (secret files pass the
// trust rules on the way), and sends random bytes through its primary.
// It returns the primary key_id. Neither the bytes nor anything derived
// from them is printed.
func checkProvider(ctx context.Context, r *report, e config.Entry) (string, bool) {
	check := "provider " + e.Name
	ctx, cancel := context.WithTimeout(ctx, providerTimeout)
	defer cancel()
	p, err := backends.OpenEntry(ctx, e, hclog.NewNullLogger())
	if err != nil {
		r.add(levelFail, check, "%s", strings.TrimPrefix(err.Error(), check+": "))
		return "", false
	}
	defer p.Close()
	kid, err := roundTrip(ctx, p)
	if err != nil {
		r.add(levelFail, check, "%v", err)
		return "", false
	}
	r.add(levelOK, check, "primary %s encrypts and decrypts", kid)
	return kid, true
}

func roundTrip(ctx context.Context, p providers.Provider) (string, error) {
	seed := make([]byte, 32)
	if _, err := rand.Read(seed); err != nil {
		return "", fmt.Errorf("random bytes: %w", err)
	}
	s, err := p.Encrypt(ctx, seed)
	if err != nil {
		return "", fmt.Errorf("encrypt with the primary: %w", err)
	}
	got, err := p.Decrypt(ctx, s)
	if err != nil {
		return s.KeyID, fmt.Errorf("decrypt what the primary %s encrypted: %w", s.KeyID, err)
	}
	if !bytes.Equal(got, seed) {
		return s.KeyID, fmt.Errorf("primary %s: decrypt returned other bytes than were encrypted; the backend is broken", s.KeyID)
	}
	return s.KeyID, nil
}

// checkSocket applies serve's folder rules to the socket path and, when a
// plugin listens there, asks it for Status. It reports whether a plugin
// answered.
func checkSocket(ctx context.Context, r *report, cfg *config.Config, primary string) bool {
	uid := uint32(os.Geteuid()) //nolint:gosec // G115: a uid is never negative
	fi, statErr := os.Lstat(cfg.Socket)
	if statErr == nil && fi.Mode()&fs.ModeSocket != 0 {
		// The running plugin's user owns its socket: judge the folders
		// for that user, not for whoever runs doctor.
		uid = fi.Sys().(*syscall.Stat_t).Uid
	}
	missing, err := plugin.CheckSocketFolder(cfg.Socket, uid)
	switch {
	case err != nil:
		r.add(levelFail, "socket folder", "%v", err)
	case missing:
		r.add(levelOK, "socket folder", "%s is missing; serve creates it 0750", filepath.Dir(cfg.Socket))
	default:
		r.add(levelOK, "socket folder", "%s is writable only by root and uid %d", filepath.Dir(cfg.Socket), uid)
	}

	switch {
	case errors.Is(statErr, fs.ErrNotExist):
		r.add(levelWarn, "plugin", "not running: no socket at %s; start kms-plugin serve --config FILE", cfg.Socket)
		return false
	case statErr != nil:
		r.add(levelFail, "plugin", "socket %s: %v", cfg.Socket, statErr)
		return false
	case fi.Mode()&fs.ModeSocket == 0:
		r.add(levelFail, "plugin", "%s is not a socket and serve will not remove it; delete it or choose another socket path", cfg.Socket)
		return false
	}
	st, err := pluginStatus(ctx, cfg.Socket)
	switch {
	case errors.Is(err, syscall.ECONNREFUSED):
		r.add(levelWarn, "plugin", "not running: %s is a stale socket nobody serves (serve removes it); start kms-plugin serve --config FILE", cfg.Socket)
		return false
	case errors.Is(err, syscall.EACCES):
		r.add(levelFail, "plugin", "cannot connect to %s: permission denied; run doctor as the apiserver's or the plugin's user, or check socketGroup and allowedPeers", cfg.Socket)
		return false
	case err != nil && cfg.AllowedPeers != nil:
		r.add(levelFail, "plugin", "Status on %s: %v; allowedPeers may not list uid %d (doctor's user), else see the plugin's log", cfg.Socket, err, os.Geteuid())
		return false
	case err != nil:
		r.add(levelFail, "plugin", "Status on %s: %v; see the plugin's log", cfg.Socket, err)
		return false
	case st.Healthz != "ok":
		r.add(levelFail, "plugin", "Status on %s: healthz %q, key_id %q; see /healthz?verbose and the plugin's log", cfg.Socket, st.Healthz, st.KeyId)
		return true
	case primary != "" && st.KeyId != primary:
		r.add(levelWarn, "plugin", "Status healthz ok, key_id %s, but the primary is now %s; the plugin follows within refreshInterval %s, else restart it", st.KeyId, primary, cfg.RefreshInterval)
		return true
	}
	r.add(levelOK, "plugin", "Status on %s: healthz ok, key_id %s, version %s", cfg.Socket, st.KeyId, st.Version)
	return true
}

// pluginStatus dials the socket and calls Status under statusTimeout. A socket
// nobody serves comes back as ECONNREFUSED.
func pluginStatus(ctx context.Context, socket string) (*kmsapi.StatusResponse, error) {
	ctx, cancel := context.WithTimeout(ctx, statusTimeout)
	defer cancel()
	// Dial first, plainly: gRPC would retry a refused connection until the
	// deadline and then report only that the deadline passed.
	var d net.Dialer
	c, err := d.DialContext(ctx, "unix", socket)
	if err != nil {
		return nil, err
	}
	c.Close()
	conn, err := grpc.NewClient("unix://"+socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return nil, err
	}
	defer conn.Close()
	return kmsapi.NewKeyManagementServiceClient(conn).Status(ctx, &kmsapi.StatusRequest{})
}

// checkHealth GETs /readyz on the health address.
func checkHealth(ctx context.Context, r *report, addr string, running bool) {
	if addr == "" {
		r.add(levelOK, "health", "not configured (health: unset)")
		return
	}
	ctx, cancel := context.WithTimeout(ctx, healthTimeout)
	defer cancel()
	url := "http://" + addr + "/readyz"
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		r.add(levelFail, "health", "%v", err)
		return
	}
	resp, err := http.DefaultClient.Do(req)
	switch {
	case err != nil && !running:
		r.add(levelWarn, "health", "not running: nothing answers %s (the plugin does not run)", url)
		return
	case err != nil:
		r.add(levelFail, "health", "GET %s: %v; the plugin runs, so another process may hold the port (see the plugin's log)", url, err)
		return
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
	if resp.StatusCode != http.StatusOK {
		r.add(levelFail, "health", "GET %s: %s: %s; see /healthz?verbose", url, resp.Status, body)
		return
	}
	r.add(levelOK, "health", "GET %s: %s", url, resp.Status)
}

// checkEncryptionConfig checks the apiserver's EncryptionConfiguration
// against this plugin: a KMS v2 provider with this socket's endpoint, a
// timeout no longer than the apiserver's default, and a first provider
// that encrypts. One line per resources block, after one for the file.
func checkEncryptionConfig(r *report, path, socket string) {
	const check = "encryption-config"
	b, err := os.ReadFile(path)
	if err != nil {
		r.add(levelFail, check, "%v", err)
		return
	}
	var ec apiserverv1.EncryptionConfiguration
	if err := yaml.UnmarshalStrict(b, &ec); err != nil {
		r.add(levelFail, check, "%s: not an EncryptionConfiguration: %v", path, err)
		return
	}
	if ec.Kind != "EncryptionConfiguration" || len(ec.Resources) == 0 {
		r.add(levelFail, check, "%s: kind %q with %d resources blocks; want kind EncryptionConfiguration listing resources (the file given to kube-apiserver --encryption-provider-config)", path, ec.Kind, len(ec.Resources))
		return
	}
	want := "unix://" + socket
	var others []string
	found := false
	for i, rc := range ec.Resources {
		name := fmt.Sprintf("%s resources[%d] (%s)", check, i, strings.Join(rc.Resources, ", "))
		ours := -1
		for j, p := range rc.Providers {
			if p.KMS == nil {
				continue
			}
			if p.KMS.Endpoint != want {
				others = append(others, p.KMS.Endpoint)
				continue
			}
			ours = j
			if p.KMS.APIVersion != "v2" {
				r.add(levelFail, name, "kms provider %s has apiVersion %q; this plugin serves KMS v2: set apiVersion: v2", p.KMS.Name, p.KMS.APIVersion)
				ours = -2
			}
			break
		}
		if ours == -1 {
			continue
		}
		found = true
		if ours == -2 {
			continue
		}
		p := rc.Providers[ours].KMS
		switch first := rc.Providers[0]; {
		case first.Identity != nil:
			r.add(levelWarn, name, "identity comes before kms provider %s, so writes are stored unencrypted; put the kms provider first", p.Name)
		case p.Timeout != nil && p.Timeout.Duration > maxAPIServerTimeout:
			r.add(levelWarn, name, "kms provider %s has timeout %s; a hung plugin holds each write that long: use at most %s", p.Name, p.Timeout.Duration, maxAPIServerTimeout)
		case ours == 0:
			r.add(levelOK, name, "kms v2 provider %s at %s encrypts writes", p.Name, want)
		default:
			r.add(levelWarn, name, "kms provider %s is not first, so it only decrypts; another provider encrypts writes (fine while migrating away from it)", p.Name)
		}
	}
	if !found {
		detail := "it has no kms provider"
		if len(others) > 0 {
			detail = "its kms endpoints are " + strings.Join(others, ", ")
		}
		r.add(levelFail, check, "%s: no kms provider has endpoint %s (%s); set endpoint: %s", path, want, detail, want)
	}
}
