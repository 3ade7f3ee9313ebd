package etcdlayout

import (
	"strings"
	"testing"
)

// FuzzParseKey: etcd keys are untrusted input to the census. A key that
// parses must rebuild, through Key, to exactly the key it came from, with a
// name (and namespace) free of "/"; and a key built from valid parts must
// parse back to those parts.
func FuzzParseKey(f *testing.F) {
	f.Add("/registry", "secrets", "/registry/secrets/ns/a", "ns", "a")
	f.Add("/registry", "secrets", "/registry/secrets/a", "", "a")
	f.Add("registry/", "example.com/widgets", "/registry/example.com/widgets/ns/w", "ns", "w")
	f.Add("/r", "/secrets/", "/r/secrets//a", "", "")
	f.Add("/registry", "secrets", "/registry/secrets/a/b/c", "a", "b/c")
	f.Add("", "", "", "", "")
	f.Fuzz(func(t *testing.T, prefix, path, key, namespace, name string) {
		l, err := New(prefix)
		if err != nil {
			return
		}
		if again, err := New(l.Prefix()); err != nil || again != l {
			t.Fatalf("New(%q).Prefix() = %q does not parse to itself: %v, %v", prefix, l.Prefix(), again, err)
		}
		if got, err := l.ParseKey(key, path); err == nil {
			if got.Resource != path || got.Name == "" || strings.Contains(got.Name, "/") || strings.Contains(got.Namespace, "/") {
				t.Fatalf("ParseKey(%q, %q) = %+v: bad parts", key, path, got)
			}
			if back := l.Key(got.Resource, got.Namespace, got.Name); back != key {
				t.Fatalf("ParseKey(%q, %q) = %+v, which rebuilds to %q", key, path, got, back)
			}
			if !strings.HasPrefix(key, l.All()) {
				t.Fatalf("ParseKey accepted %q outside %s", key, l.All())
			}
		}
		// Valid parts round-trip through Key and ParseKey.
		if name == "" || strings.Contains(name, "/") || strings.Contains(namespace, "/") {
			return
		}
		k := l.Key(path, namespace, name)
		got, err := l.ParseKey(k, path)
		if err != nil {
			t.Fatalf("ParseKey(Key(%q, %q, %q) = %q): %v", path, namespace, name, k, err)
		}
		if want := (ObjectKey{Resource: path, Namespace: namespace, Name: name}); got != want {
			t.Fatalf("ParseKey(Key(...) = %q) = %+v, want %+v", k, got, want)
		}
	})
}
