// Command keyvault-emulator serves a local Azure Key Vault (keys) and Entra
// ID token endpoint over HTTPS on loopback, for end-to-end tests of the
// azurekv provider without Azure.
//
//	go run ./e2e/keyvault-emulator --addr 127.0.0.1:0 --dir DIR --client ID=SECRET [--role ID=ROLE]
//
// Each client has a role on every key: cryptoOfficer (the default; every
// operation, like Azure's "Key Vault Crypto Officer") or
// cryptoServiceEncryptionUser (get, list versions, wrapKey and unwrapKey
// only, like "Key Vault Crypto Service Encryption User"); other operations
// answer 403 ForbiddenByRbac. Give the plugin's client the latter and
// kmsctl's the former to run the least-privilege split of
// manifests/identities.
//
// It prints its URL (vault URL and authority host at once) on stdout, writes
// DIR/ca.pem for clients to trust, and runs until SIGINT or SIGTERM. Point
// the plugin at it with vaultURL and auth.authorityHost set to that URL,
// auth.tenantID set to the printed tenant (stderr), and caFile DIR/ca.pem.
package main

import (
	"flag"
	"fmt"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/kms-v2/kms-plugin/e2e/keyvault-emulator/emulator"
)

// clientFlags collects repeated --client ID=SECRET flags.
type clientFlags map[string]string

func (c clientFlags) String() string { return fmt.Sprintf("%d clients", len(c)) }

func (c clientFlags) Set(s string) error {
	id, secret, ok := strings.Cut(s, "=")
	if !ok || id == "" || secret == "" {
		return fmt.Errorf("want ID=SECRET, got %q", s)
	}
	c[id] = secret
	return nil
}

// roleFlags collects repeated --role ID=ROLE flags.
type roleFlags map[string]emulator.Role

func (r roleFlags) String() string { return fmt.Sprintf("%d roles", len(r)) }

func (r roleFlags) Set(s string) error {
	id, name, ok := strings.Cut(s, "=")
	if !ok || id == "" {
		return fmt.Errorf("want ID=ROLE, got %q", s)
	}
	role, err := emulator.ParseRole(name)
	if err != nil {
		return err
	}
	r[id] = role
	return nil
}

func main() {
	clients := clientFlags{}
	roles := roleFlags{}
	addr := flag.String("addr", "127.0.0.1:0", "listen address (loopback; port 0 picks a free one)")
	dir := flag.String("dir", "", "folder for ca.pem (required)")
	tenant := flag.String("tenant", emulator.DefaultTenantID, "tenant ID named in the bearer challenge")
	latency := flag.Duration("latency", 0, "delay added to every Key Vault request")
	flag.Var(clients, "client", "register a client as ID=SECRET (repeatable); the secret may also be read from a file with ID=@FILE")
	flag.Var(roles, "role", "give a client a role as ID=ROLE (repeatable): "+string(emulator.RoleCryptoOfficer)+" (default: every operation) or "+
		string(emulator.RoleCryptoServiceEncryptionUser)+" (get, list, wrapKey, unwrapKey only)")
	flag.Parse()
	if *dir == "" {
		fmt.Fprintln(os.Stderr, "keyvault-emulator: --dir is required (ca.pem goes there)")
		os.Exit(2)
	}
	for id := range roles {
		if _, ok := clients[id]; !ok {
			fmt.Fprintf(os.Stderr, "keyvault-emulator: --role %s: no --client %s=SECRET registers that client\n", id, id)
			os.Exit(2)
		}
	}
	for id, secret := range clients {
		if path, ok := strings.CutPrefix(secret, "@"); ok {
			b, err := os.ReadFile(path)
			if err != nil {
				fmt.Fprintf(os.Stderr, "keyvault-emulator: --client %s: %v\n", id, err)
				os.Exit(2)
			}
			clients[id] = strings.TrimSpace(string(b))
		}
	}
	e, err := emulator.Start(emulator.Options{Addr: *addr, Dir: *dir, TenantID: *tenant, Clients: clients, Roles: roles})
	if err != nil {
		fmt.Fprintln(os.Stderr, "keyvault-emulator:", err)
		os.Exit(1)
	}
	e.SetLatency(*latency)
	fmt.Println(e.URL)
	fmt.Fprintf(os.Stderr, "keyvault-emulator: serving %s, tenant %s, CA %s, %d clients\n", e.URL, e.TenantID, e.CAFile, len(clients))
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGINT, syscall.SIGTERM)
	<-sig
	start := time.Now()
	_ = e.Close()
	fmt.Fprintf(os.Stderr, "keyvault-emulator: stopped in %s\n", time.Since(start).Round(time.Millisecond))
}
