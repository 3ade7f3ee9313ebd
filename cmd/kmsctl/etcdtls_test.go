package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/kms-v2/kms-plugin/internal/testpki"
)

// tlsServer serves TLS as etcd does with --client-cert-auth: its serving
// pair, clients must present a certificate its CA signed. It completes
// handshakes and then waits, as etcd waits for the gRPC preface.
func tlsServer(t *testing.T, pki testpki.EtcdPKI) string {
	t.Helper()
	pair, err := tls.LoadX509KeyPair(pki.ServerCert, pki.ServerKey)
	if err != nil {
		t.Fatal(err)
	}
	caPEM, err := os.ReadFile(pki.CA)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(caPEM)
	ln, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{Certificates: []tls.Certificate{pair}, ClientCAs: pool, ClientAuth: tls.RequireAndVerifyClientCert})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer conn.Close()
				if conn.(*tls.Conn).Handshake() == nil {
					_, _ = conn.Read(make([]byte, 1)) // until the client goes
				}
			}()
		}
	}()
	return ln.Addr().String()
}

func TestDiagnoseEtcd(t *testing.T) {
	pki, err := testpki.WriteEtcd(filepath.Join(t.TempDir(), "pki"))
	if err != nil {
		t.Fatal(err)
	}
	other, err := testpki.WriteEtcd(filepath.Join(t.TempDir(), "other"))
	if err != nil {
		t.Fatal(err)
	}
	addr := tlsServer(t, pki)
	closed, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	refused := closed.Addr().String()
	closed.Close()

	good, err := pki.ClientTLS()
	if err != nil {
		t.Fatal(err)
	}
	noClient := good.Clone()
	noClient.Certificates, noClient.GetClientCertificate = nil, nil
	wrongCA, err := other.ClientTLS() // trusts another CA, presents a pair etcd's CA did not sign
	if err != nil {
		t.Fatal(err)
	}
	// A name the serving certificate lacks, as when an endpoint is given
	// by a host name etcd's certificate was not made for.
	otherName := good.Clone()
	otherName.ServerName = "etcd.example"
	otherPair := good.Clone()
	otherPair.Certificates, otherPair.GetClientCertificate = wrongCA.Certificates, wrongCA.GetClientCertificate
	for _, tc := range []struct {
		name     string
		endpoint string
		tls      *tls.Config
		want     string // "" means no diagnosis
	}{
		{"Fine", "https://" + addr, good, ""},
		{"Refused", "https://" + refused, good, "check --etcd-endpoints"},
		{"NoClientCertificate", "https://" + addr, noClient, "give --etcd-cert and --etcd-key"},
		{"ClientCertificateOfAnotherCA", "https://" + addr, otherPair, "give --etcd-cert and --etcd-key"},
		{"UnknownCA", "https://" + addr, wrongCA, "give --etcd-cacert"},
		{"NoTLSFlags", "https://" + addr, nil, "give --etcd-cacert"},
		{"WrongName", "https://" + addr, otherName, "name etcd in --etcd-endpoints as its certificate does"},
		{"PlainHTTP", "http://" + addr, nil, "write the endpoint as https://" + addr},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := diagnoseEtcd(context.Background(), tc.endpoint, tc.tls)
			t.Logf("%s: %v", tc.endpoint, err)
			switch {
			case tc.want == "" && err != nil:
				t.Errorf("got %v, want no diagnosis", err)
			case tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)):
				t.Errorf("got %v, want it to say %q", err, tc.want)
			case err != nil && strings.Contains(err.Error(), "\n"):
				t.Errorf("want one line, got %q", err)
			}
		})
	}
}
