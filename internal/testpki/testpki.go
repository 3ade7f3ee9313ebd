// Package testpki makes etcd's certificates as kubeadm lays them out, for
// tests: a CA, etcd's serving pair and the apiserver's client pair. The
// e2e harness runs etcd with them; kmsctl's unit tests serve TLS with
// them.
package testpki

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"time"

	"go.etcd.io/etcd/client/pkg/v3/transport"
)

// EtcdPKI is etcd's certificates at the paths kubeadm gives them under
// /etc/kubernetes/pki, relative to Dir. Keys are 0600, owned by whoever
// runs the tests (root in CI, as kubeadm's are).
type EtcdPKI struct {
	// Dir stands for /etc/kubernetes/pki.
	Dir string
	// CA is etcd/ca.crt: it signed etcd's serving certificate and the
	// clients'.
	CA string
	// ServerCert and ServerKey are etcd/server.crt and .key (SANs
	// 127.0.0.1 and localhost).
	ServerCert, ServerKey string
	// ClientCert and ClientKey are apiserver-etcd-client.crt and .key, the
	// kube-apiserver's client certificate, which kmsctl uses too.
	ClientCert, ClientKey string
}

// NodePath is the path on a kubeadm node of one of the files above, e.g.
// NodePath(p.CA) = /etc/kubernetes/pki/etcd/ca.crt.
func (p EtcdPKI) NodePath(file string) string {
	rel, err := filepath.Rel(p.Dir, file)
	if err != nil {
		return file
	}
	return filepath.Join("/etc/kubernetes/pki", rel)
}

// Keys are the private keys' paths, for a leak check.
func (p EtcdPKI) Keys() []string { return []string{p.ServerKey, p.ClientKey} }

// ClientTLS is the client side: the CA and the apiserver's client pair.
func (p EtcdPKI) ClientTLS() (*tls.Config, error) {
	info := transport.TLSInfo{TrustedCAFile: p.CA, CertFile: p.ClientCert, KeyFile: p.ClientKey}
	return info.ClientConfig()
}

// WriteEtcd makes a fresh CA and the two certificate pairs under dir.
// ECDSA P-256 and a day's validity: a test lives minutes.
func WriteEtcd(dir string) (EtcdPKI, error) {
	p := EtcdPKI{
		Dir:        dir,
		CA:         filepath.Join(dir, "etcd", "ca.crt"),
		ServerCert: filepath.Join(dir, "etcd", "server.crt"),
		ServerKey:  filepath.Join(dir, "etcd", "server.key"),
		ClientCert: filepath.Join(dir, "apiserver-etcd-client.crt"),
		ClientKey:  filepath.Join(dir, "apiserver-etcd-client.key"),
	}
	if err := os.MkdirAll(filepath.Join(dir, "etcd"), 0o750); err != nil {
		return EtcdPKI{}, err
	}
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return EtcdPKI{}, err
	}
	caTmpl := template("etcd-ca")
	caTmpl.IsCA, caTmpl.BasicConstraintsValid = true, true
	caTmpl.KeyUsage = x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		return EtcdPKI{}, err
	}
	ca, err := x509.ParseCertificate(caDER)
	if err != nil {
		return EtcdPKI{}, err
	}
	if err := writePEM(p.CA, "CERTIFICATE", caDER, 0o644); err != nil {
		return EtcdPKI{}, err
	}
	server := template("kube-etcd")
	server.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth}
	server.IPAddresses = []net.IP{net.IPv4(127, 0, 0, 1)}
	server.DNSNames = []string{"localhost"}
	if err := issue(server, ca, caKey, p.ServerCert, p.ServerKey); err != nil {
		return EtcdPKI{}, err
	}
	client := template("kube-apiserver-etcd-client")
	client.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}
	if err := issue(client, ca, caKey, p.ClientCert, p.ClientKey); err != nil {
		return EtcdPKI{}, err
	}
	return p, nil
}

func template(cn string) *x509.Certificate {
	serial, _ := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 62))
	now := time.Now()
	return &x509.Certificate{
		SerialNumber: serial,
		Subject:      pkix.Name{CommonName: cn},
		NotBefore:    now.Add(-time.Minute),
		NotAfter:     now.Add(24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
	}
}

// issue signs tmpl with the CA and writes the certificate (0644) and its
// new key (0600).
func issue(tmpl, ca *x509.Certificate, caKey *ecdsa.PrivateKey, certPath, keyPath string) error {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &key.PublicKey, caKey)
	if err != nil {
		return fmt.Errorf("sign %s: %w", tmpl.Subject.CommonName, err)
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return err
	}
	if err := writePEM(certPath, "CERTIFICATE", der, 0o644); err != nil {
		return err
	}
	return writePEM(keyPath, "PRIVATE KEY", keyDER, 0o600)
}

func writePEM(path, kind string, der []byte, mode os.FileMode) error {
	return os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: kind, Bytes: der}), mode)
}
