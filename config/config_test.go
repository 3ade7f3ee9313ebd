package config

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestParse(t *testing.T) {
	dir := "/etc/kms-plugin"
	tests := []struct {
		name    string
		yaml    string
		wantErr string
		check   func(t *testing.T, c *Config)
	}{
		{
			name: "minimal with defaults and relative keyset",
			yaml: "socket: /run/kms/kms.sock\nprovider:\n  file:\n    path: keyset.json\n",
			check: func(t *testing.T, c *Config) {
				if got, want := c.Providers[0].Section.Instance(), "/etc/kms-plugin/keyset.json"; got != want {
					t.Errorf("file.path = %q, want %q", got, want)
				}
				if got, want := time.Duration(c.CheckInterval), DefaultCheckInterval; got != want {
					t.Errorf("checkInterval = %v, want %v", got, want)
				}
				if c.Log.Level != "info" || c.Log.Format != "text" {
					t.Errorf("log = %+v, want info/text", c.Log)
				}
			},
		},
		{
			name: "relative socket resolves against the config folder",
			yaml: "socket: run/kms.sock\nprovider: {file: {path: /k.json}}\n",
			check: func(t *testing.T, c *Config) {
				if got, want := c.Socket, "/etc/kms-plugin/run/kms.sock"; got != want {
					t.Errorf("socket = %q, want %q", got, want)
				}
			},
		},
		{
			name: "all fields",
			yaml: "socket: /s\nsocketGroup: kms\nhealth: 127.0.0.1:8080\ncheckInterval: 2s\nrefreshInterval: 1s\nmaxStaleness: 1m\nlog: {level: debug, format: json}\nprovider: {file: {path: /k}}\n",
			check: func(t *testing.T, c *Config) {
				if c.SocketGroup != "kms" || c.Health != "127.0.0.1:8080" || time.Duration(c.MaxStaleness) != time.Minute {
					t.Errorf("parsed %+v", c)
				}
			},
		},
		{
			name: "socket of exactly 107 bytes",
			yaml: "socket: /" + strings.Repeat("s", 106) + "\nprovider: {file: {path: /k}}\n",
			check: func(t *testing.T, c *Config) {
				if got, want := len(c.Socket), 107; got != want {
					t.Errorf("len(socket) = %d, want %d", got, want)
				}
			},
		},
		{
			name: "numeric socketGroup as a YAML number",
			yaml: "socket: /s\nsocketGroup: 1000\nprovider: {file: {path: /k}}\n",
			check: func(t *testing.T, c *Config) {
				if got, want := c.SocketGroup, "1000"; got != want {
					t.Errorf("socketGroup = %q, want %q", got, want)
				}
			},
		},
		{
			name: "allowedPeers",
			yaml: "socket: /s\nallowedPeers:\n  uids: [0]\n  gids: [1001, 4294967294]\nprovider: {file: {path: /k}}\n",
			check: func(t *testing.T, c *Config) {
				p := c.AllowedPeers
				if p == nil || len(p.UIDs) != 1 || p.UIDs[0] != 0 || len(p.GIDs) != 2 || p.GIDs[1] != MaxID {
					t.Errorf("allowedPeers = %+v, want uids [0], gids [1001 4294967294]", p)
				}
			},
		},
		{
			name: "no allowedPeers",
			yaml: "socket: /s\nprovider: {file: {path: /k}}\n",
			check: func(t *testing.T, c *Config) {
				if c.AllowedPeers != nil {
					t.Errorf("allowedPeers = %+v, want unset", c.AllowedPeers)
				}
			},
		},
		{
			name: "metrics on every interface, opted in",
			yaml: "socket: /s\nmetrics: {address: \":9788\", allowRemote: true}\nprovider: {file: {path: /k}}\n",
			check: func(t *testing.T, c *Config) {
				if c.Metrics == nil || c.Metrics.Address != ":9788" || !c.Metrics.AllowRemote {
					t.Errorf("metrics = %+v, want :9788 with allowRemote", c.Metrics)
				}
			},
		},
		{
			name: "metrics on loopback needs no opt-in",
			yaml: "socket: /s\nmetrics: {address: 127.0.0.1:9788}\nprovider: {file: {path: /k}}\n",
			check: func(t *testing.T, c *Config) {
				if c.Metrics == nil || c.Metrics.Address != "127.0.0.1:9788" {
					t.Errorf("metrics = %+v, want 127.0.0.1:9788", c.Metrics)
				}
			},
		},
		{name: "unknown field is named", yaml: "socket: /s\nsokcet: /x\nprovider: {file: {path: /k}}\n", wantErr: `unknown field "sokcet"`},
		{name: "unknown provider field is named", yaml: "socket: /s\nprovider: {file: {path: /k, pth: x}}\n", wantErr: `unknown field "pth"`},
		{name: "malformed yaml", yaml: "socket: [\n", wantErr: "yaml"},
		{name: "missing socket", yaml: "provider: {file: {path: /k}}\n", wantErr: "socket: missing"},
		{name: "abstract socket", yaml: "socket: '@kms'\nprovider: {file: {path: /k}}\n", wantErr: "abstract"},
		{name: "no provider", yaml: "socket: /s\n", wantErr: "providers: empty"},
		{name: "file without path", yaml: "socket: /s\nprovider: {file: {}}\n", wantErr: "provider.file: path: missing"},
		{name: "health not loopback", yaml: "socket: /s\nhealth: 0.0.0.0:80\nprovider: {file: {path: /k}}\n", wantErr: "loopback"},
		{name: "metrics on every interface without opt-in", yaml: "socket: /s\nmetrics: {address: \":9788\"}\nprovider: {file: {path: /k}}\n", wantErr: `metrics.address ":9788": must be a loopback address`},
		{name: "metrics on a node IP names the fix", yaml: "socket: /s\nmetrics: {address: 10.0.0.5:9788}\nprovider: {file: {path: /k}}\n", wantErr: "set metrics.allowRemote: true"},
		{name: "metrics without address", yaml: "socket: /s\nmetrics: {allowRemote: true}\nprovider: {file: {path: /k}}\n", wantErr: "metrics.address: missing"},
		{name: "metrics address without port", yaml: "socket: /s\nmetrics: {address: 10.0.0.5, allowRemote: true}\nprovider: {file: {path: /k}}\n", wantErr: "want HOST:PORT"},
		{name: "metrics on the health address", yaml: "socket: /s\nhealth: 127.0.0.1:8787\nmetrics: {address: 127.0.0.1:8787}\nprovider: {file: {path: /k}}\n", wantErr: "is the health address too"},
		{name: "metrics unknown field", yaml: "socket: /s\nmetrics: {addr: 127.0.0.1:9788}\nprovider: {file: {path: /k}}\n", wantErr: `unknown field "addr"`},
		{name: "bad duration", yaml: "socket: /s\ncheckInterval: soon\nprovider: {file: {path: /k}}\n", wantErr: "duration"},
		{name: "tiny interval", yaml: "socket: /s\nrefreshInterval: 1ms\nprovider: {file: {path: /k}}\n", wantErr: "refreshInterval"},
		{name: "bad log level", yaml: "socket: /s\nlog: {level: loud}\nprovider: {file: {path: /k}}\n", wantErr: "log.level"},
		{name: "socket as a YAML number", yaml: "socket: 123\nprovider: {file: {path: /k}}\n", wantErr: "socket: 123 is a YAML number"},
		{name: "socket as a YAML boolean", yaml: "socket: true\nprovider: {file: {path: /k}}\n", wantErr: "socket: true is a YAML boolean"},
		{name: "socket over the sun_path limit", yaml: "socket: /" + strings.Repeat("s", 107) + "\nprovider: {file: {path: /k}}\n", wantErr: "107-byte limit"},
		{name: "relative socket resolved over the limit", yaml: "socket: " + strings.Repeat("s", 95) + "\nprovider: {file: {path: /k}}\n", wantErr: "107-byte limit"},
		{name: "socketGroup -1", yaml: "socket: /s\nsocketGroup: \"-1\"\nprovider: {file: {path: /k}}\n", wantErr: "gid from 0 to 4294967294"},
		{name: "socketGroup -1 as a YAML number", yaml: "socket: /s\nsocketGroup: -1\nprovider: {file: {path: /k}}\n", wantErr: "gid from 0 to 4294967294"},
		{name: "socketGroup out of range", yaml: "socket: /s\nsocketGroup: 4294967295\nprovider: {file: {path: /k}}\n", wantErr: "gid from 0 to 4294967294"},
		{name: "allowedPeers empty", yaml: "socket: /s\nallowedPeers: {}\nprovider: {file: {path: /k}}\n", wantErr: "allowedPeers: lists no uid or gid"},
		{name: "allowedPeers negative uid", yaml: "socket: /s\nallowedPeers: {uids: [0, -1]}\nprovider: {file: {path: /k}}\n", wantErr: "allowedPeers.uids[1] -1: want an id from 0 to 4294967294"},
		{name: "allowedPeers gid out of range", yaml: "socket: /s\nallowedPeers: {gids: [4294967295]}\nprovider: {file: {path: /k}}\n", wantErr: "allowedPeers.gids[0]"},
		{name: "allowedPeers unknown field", yaml: "socket: /s\nallowedPeers: {users: [0]}\nprovider: {file: {path: /k}}\n", wantErr: `unknown field "users"`},
		{name: "socketGroup with a space", yaml: "socket: /s\nsocketGroup: kms admins\nprovider: {file: {path: /k}}\n", wantErr: "not a group name or gid"},
		{name: "socketGroup empty name", yaml: "socket: /s\nsocketGroup: \" \"\nprovider: {file: {path: /k}}\n", wantErr: "socketGroup"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, err := Parse([]byte(tt.yaml), dir, testKinds)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("Parse: got %v, want an error containing %q", err, tt.wantErr)
				}
				if strings.Contains(err.Error(), "\n") {
					t.Fatalf("error is not one line: %q", err)
				}
				return
			}
			if err != nil {
				t.Fatalf("Parse: %v", err)
			}
			tt.check(t, c)
		})
	}
}

func TestLoadNamesTheFile(t *testing.T) {
	p := filepath.Join(t.TempDir(), "bad.yaml")
	if err := os.WriteFile(p, []byte("socket: [\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := Load(p, testKinds); err == nil || !strings.Contains(err.Error(), p) {
		t.Fatalf("Load: got %v, want an error naming %s", err, p)
	}
	if _, err := Load(filepath.Join(t.TempDir(), "missing.yaml"), testKinds); err == nil {
		t.Fatal("Load of a missing file succeeded")
	}
}

func FuzzParse(f *testing.F) {
	f.Add([]byte("socket: /s\nprovider: {file: {path: k}}\n"))
	f.Add([]byte("socket: '@x'\n"))
	f.Add([]byte("{"))
	f.Add([]byte("socket: 123\nsocketGroup: \"-1\"\nallowedPeers: {uids: [0], gids: [65534]}\nprovider: {file: {path: k}}\n"))
	f.Add([]byte("socket: /s\nproviders: [{file: {path: a}}, {name: x, keyState: shared, hsm: {path: b}}]\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		c, err := Parse(data, "/etc", testKinds)
		if err != nil {
			return
		}
		if err := c.Validate(); err != nil {
			t.Fatalf("Parse returned a config that fails Validate: %v", err)
		}
	})
}

func TestCheckLoopback(t *testing.T) {
	tests := []struct {
		name, addr string
		wantErr    error
		wantMsg    string
	}{
		{"ipv4 loopback", "127.0.0.1:9090", nil, ""},
		{"ipv6 loopback", "[::1]:9090", nil, ""},
		{"localhost", "localhost:9090", nil, ""},
		{"every interface", ":9090", ErrNotLoopback, `":9090": must be a loopback address`},
		{"wildcard", "0.0.0.0:9090", ErrNotLoopback, "loopback"},
		{"remote host", "10.0.0.1:9090", ErrNotLoopback, "loopback"},
		{"no port", "127.0.0.1", nil, "want 127.0.0.1:PORT"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := CheckLoopback(tt.addr)
			if tt.wantMsg == "" {
				if err != nil {
					t.Fatalf("got %v, want nil", err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tt.wantMsg) {
				t.Fatalf("got %v, want %q", err, tt.wantMsg)
			}
			if tt.wantErr != nil && !errors.Is(err, tt.wantErr) {
				t.Fatalf("got %v, want errors.Is %v", err, tt.wantErr)
			}
		})
	}
}
