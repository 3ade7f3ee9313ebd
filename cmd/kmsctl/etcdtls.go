package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"net/url"
	"strings"
	"time"
)

// kubeadm's paths, named in the fixes below: most clusters are laid out so.
const (
	kubeadmEtcdCA     = "/etc/kubernetes/pki/etcd/ca.crt"
	kubeadmEtcdClient = "/etc/kubernetes/pki/apiserver-etcd-client.crt and .key"
)

// probeTimeout bounds each step of diagnoseEtcd: it runs only after etcd
// failed to answer, to say why.
const probeTimeout = 2 * time.Second

// diagnoseEtcd says why an etcd endpoint does not answer kmsctl, naming the
// flag that fixes it: the gRPC client only reports a deadline, because it
// keeps retrying the handshake that failed. It connects once itself, with
// the same TLS settings, and reads the TLS outcome. It returns nil when
// the connection is fine or it cannot tell.
func diagnoseEtcd(ctx context.Context, endpoint string, tc *tls.Config) error {
	u, err := url.Parse(endpoint)
	if err != nil || u.Host == "" {
		return nil
	}
	d := net.Dialer{Timeout: probeTimeout}
	conn, err := d.DialContext(ctx, "tcp", u.Host)
	if err != nil {
		return fmt.Errorf("cannot connect: %v; check --etcd-endpoints", oneLine(err))
	}
	defer conn.Close()
	if u.Scheme != "https" {
		if servesTLS(conn) {
			return fmt.Errorf("it serves TLS; write the endpoint as https://%s in --etcd-endpoints", u.Host)
		}
		return nil
	}
	if tc == nil {
		tc = &tls.Config{}
	}
	tc = tc.Clone()
	if tc.ServerName == "" {
		tc.ServerName = u.Hostname()
	}
	return tlsOutcome(tls.Client(conn, tc))
}

// diagnoseEtcds is diagnoseEtcd for each endpoint in turn: the first
// cause found, prefixed with its endpoint when there are several.
func diagnoseEtcds(ctx context.Context, endpoints []string, tc *tls.Config) error {
	for _, ep := range endpoints {
		if err := diagnoseEtcd(ctx, ep, tc); err != nil {
			if len(endpoints) > 1 {
				err = fmt.Errorf("%s: %w", ep, err)
			}
			return err
		}
	}
	return nil
}

// servesTLS reports whether the server at conn completes a TLS handshake
// (whatever its certificate): an http:// endpoint pointed at a TLS port.
func servesTLS(conn net.Conn) bool {
	_ = conn.SetDeadline(time.Now().Add(probeTimeout))
	c := tls.Client(conn, &tls.Config{InsecureSkipVerify: true}) //nolint:gosec // only asks whether it speaks TLS; nothing is sent
	return c.Handshake() == nil
}

// tlsOutcome runs the handshake and then waits briefly for the server's
// verdict on our certificate: under TLS 1.3 a server refuses a client
// certificate only after the client has finished its side.
func tlsOutcome(c *tls.Conn) error {
	_ = c.SetDeadline(time.Now().Add(probeTimeout))
	err := c.Handshake()
	if err == nil {
		_ = c.SetReadDeadline(time.Now().Add(probeTimeout))
		_, err = c.Read(make([]byte, 1))
	}
	var unknownCA x509.UnknownAuthorityError
	var hostname x509.HostnameError
	switch {
	case err == nil:
		return nil
	case errors.As(err, &unknownCA):
		return fmt.Errorf("its serving certificate is not signed by a CA kmsctl trusts; give --etcd-cacert the CA that signed it (kubeadm: %s)", kubeadmEtcdCA)
	case errors.As(err, &hostname):
		return fmt.Errorf("its serving certificate is not valid for %s (%v); name etcd in --etcd-endpoints as its certificate does", c.ConnectionState().ServerName, hostname)
	case clientCertRefused(err):
		return fmt.Errorf("it refused kmsctl's client certificate (%v); give --etcd-cert and --etcd-key, a client pair signed by etcd's CA (kubeadm: %s)", err, kubeadmEtcdClient)
	case isTimeout(err):
		return nil // no verdict: the server waits for us, TLS is fine
	}
	return fmt.Errorf("TLS: %v; check --etcd-cacert, --etcd-cert and --etcd-key", oneLine(err))
}

// clientCertRefused: the server sent one of the alerts for a missing or
// untrusted client certificate. crypto/tls reports a received alert as a
// net.OpError "remote error" around an unexported type, so its text is
// what there is to read.
func clientCertRefused(err error) bool {
	var op *net.OpError
	if !errors.As(err, &op) || op.Op != "remote error" {
		return false
	}
	s := op.Err.Error()
	for _, w := range []string{"certificate required", "bad certificate", "unknown certificate authority", "certificate unknown"} {
		if strings.Contains(s, w) {
			return true
		}
	}
	return false
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}
