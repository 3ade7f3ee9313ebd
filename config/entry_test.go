package config

import (
	"context"
	"errors"
	"path/filepath"
	"strings"
	"testing"

	"github.com/hashicorp/go-hclog"

	"github.com/kms-v2/kms-plugin/providers"
)

// section is a backend section for tests: the config layer must work with
// whatever kinds the binary declares, so it is tested without the real
// backends.
type section struct {
	Path string `json:"path"`
}

func (s *section) ResolvePaths(dir string) {
	if s.Path != "" && !filepath.IsAbs(s.Path) {
		s.Path = filepath.Join(dir, s.Path)
	}
}

func (s section) Validate() error {
	if s.Path == "" {
		return errors.New("path: missing; set the keyset file")
	}
	return nil
}

func (s *section) Instance() string { return s.Path }

func testKind(name, prefix string, scope providers.Scope) providers.Kind {
	return providers.Declare(providers.Kind{Name: name, KeyIDPrefix: prefix, Scope: scope},
		func(context.Context, section, hclog.Logger) (providers.Provider, error) {
			return nil, errors.New("not in tests")
		},
		func(context.Context, section, hclog.Logger) (providers.KeyVersion, error) {
			return providers.KeyVersion{}, nil
		})
}

// testKinds stand for the compiled-in backends: a per-node and a shared one.
var testKinds = providers.Kinds{
	testKind("file", "file", providers.ScopePerNode),
	testKind("hsm", "hsm", providers.ScopeShared),
}

func TestEntries(t *testing.T) {
	tests := []struct {
		name    string
		yaml    string
		want    []string // name/kind/keyState/instance of each entry
		wantErr string
	}{
		{name: "shorthand is a one-entry list", yaml: "provider: {file: {path: k}}",
			want: []string{"file/file/perNode//etc/k"}},
		{name: "list in order with default names", yaml: "providers: [{hsm: {path: a}}, {file: {path: b}}, {hsm: {path: c}}]",
			want: []string{"hsm/hsm/shared//etc/a", "file/file/perNode//etc/b", "hsm-2/hsm/shared//etc/c"}},
		{name: "names and keyState override", yaml: "providers: [{name: tpm, keyState: perNode, hsm: {path: a}}, {name: old, file: {path: b}}]",
			want: []string{"tpm/hsm/perNode//etc/a", "old/file/perNode//etc/b"}},
		{name: "empty list", yaml: "providers: []", wantErr: "providers: empty"},
		{name: "both shapes", yaml: "provider: {file: {path: a}}\nproviders: [{hsm: {path: b}}]", wantErr: "provider and providers are both set"},
		{name: "unknown backend named", yaml: "providers: [{file: {path: a}}, {vault: {path: b}}]", wantErr: `providers[1]: unknown field or backend "vault"; an entry has name, keyState and one of file, hsm`},
		{name: "unknown field in the shorthand", yaml: "provider: {file: {path: a}, nmae: x}", wantErr: `provider: unknown field or backend "nmae"`},
		{name: "unknown field in a section", yaml: "providers: [{file: {path: a, pth: b}}]", wantErr: `providers[0].file: unknown field "pth"`},
		{name: "two backends in one entry", yaml: "providers: [{file: {path: a}, hsm: {path: b}}]", wantErr: "providers[0]: 2 backends configured (file, hsm)"},
		{name: "entry without backend", yaml: "providers: [{name: x}]", wantErr: "providers[0]: no backend configured"},
		{name: "same key twice", yaml: "providers: [{hsm: {path: /a}}, {name: again, hsm: {path: /a}}]", wantErr: "providers[0] and providers[1] both reach hsm key /a"},
		{name: "same key under other spelling", yaml: "providers: [{hsm: {path: a}}, {name: again, hsm: {path: /etc/a}}]", wantErr: "both reach hsm key /etc/a"},
		{name: "same name twice", yaml: "providers: [{name: x, hsm: {path: a}}, {name: x, file: {path: b}}]", wantErr: `both named "x"`},
		{name: "bad name", yaml: "providers: [{name: 'a b', hsm: {path: a}}]", wantErr: `providers[0].name "a b"`},
		{name: "bad keyState", yaml: "providers: [{keyState: global, hsm: {path: a}}]", wantErr: `providers[0].keyState "global": want shared or perNode`},
		{name: "section invalid", yaml: "providers: [{hsm: {path: a}}, {file: {}}]", wantErr: "providers[1].file: path: missing"},
		{name: "shorthand section invalid", yaml: "provider: {file: {}}", wantErr: "provider.file: path: missing"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, err := Parse([]byte("socket: /s\n"+tt.yaml+"\n"), "/etc", testKinds)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) || strings.Contains(err.Error(), "\n") {
					t.Fatalf("Parse: got %v, want one line containing %q", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatalf("Parse: %v", err)
			}
			var got []string
			for _, e := range c.Providers {
				got = append(got, e.Name+"/"+e.Kind.Name+"/"+string(e.KeyState)+"/"+e.Section.Instance())
			}
			if strings.Join(got, " ") != strings.Join(tt.want, " ") || c.Provider != nil {
				t.Fatalf("entries = %v (provider %v), want %v", got, c.Provider, tt.want)
			}
		})
	}
}
