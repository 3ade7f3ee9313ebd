package etcdlayout

import (
	"fmt"
	"strings"
)

// DefaultPrefix is kube-apiserver's default --etcd-prefix.
const DefaultPrefix = "/registry"

// Layout is where one apiserver keeps its objects in etcd. The zero value is
// not usable; use New or Default. Layout is a small value, safe to copy and
// to use concurrently.
type Layout struct {
	prefix string // without the trailing "/"
}

// Default is the layout of an apiserver started without --etcd-prefix.
func Default() Layout { return Layout{prefix: DefaultPrefix} }

// New returns the layout of an apiserver started with --etcd-prefix=prefix.
// As the apiserver does, a missing leading "/" is added and a trailing one
// dropped.
func New(prefix string) (Layout, error) {
	// Trimmed again after the slashes, so Prefix() parses to itself.
	p := strings.TrimSpace(strings.TrimRight(strings.TrimSpace(prefix), "/"))
	if p == "" {
		return Layout{}, fmt.Errorf("etcd prefix %q: want a key prefix such as %s", prefix, DefaultPrefix)
	}
	if !strings.HasPrefix(p, "/") {
		p = "/" + p
	}
	if strings.Contains(p, "//") {
		return Layout{}, fmt.Errorf("etcd prefix %q: empty path segment", prefix)
	}
	return Layout{prefix: p}, nil
}

// Prefix is the --etcd-prefix value, without a trailing "/".
func (l Layout) Prefix() string { return l.prefix }

// String is the prefix, for messages.
func (l Layout) String() string { return l.prefix }

// All is the prefix of every object the apiserver stores.
func (l Layout) All() string { return l.prefix + "/" }

// ResourcePrefix is where the objects of one resource live, ending in "/".
// path is how the key spells the resource: "secrets", "configmaps", or
// "<group>/<resource>" for a custom resource.
func (l Layout) ResourcePrefix(path string) string {
	return l.prefix + "/" + strings.Trim(path, "/") + "/"
}

// Key is the etcd key of one object; namespace is "" for a cluster-scoped
// object.
func (l Layout) Key(path, namespace, name string) string {
	if namespace == "" {
		return l.ResourcePrefix(path) + name
	}
	return l.ResourcePrefix(path) + namespace + "/" + name
}

// ObjectKey is an etcd key split into its parts.
type ObjectKey struct {
	// Resource is the key's spelling of the resource ("secrets",
	// "<group>/<resource>").
	Resource  string
	Namespace string
	Name      string
}

// ParseKey splits a key of the resource spelled path. The caller says which
// resource it scanned, since the key alone cannot tell a group from a
// namespace.
func (l Layout) ParseKey(key, path string) (ObjectKey, error) {
	prefix := l.ResourcePrefix(path)
	rest, ok := strings.CutPrefix(key, prefix)
	if !ok {
		return ObjectKey{}, fmt.Errorf("etcd key %q is not under %s", key, prefix)
	}
	parts := strings.Split(rest, "/")
	switch {
	case len(parts) == 1 && parts[0] != "":
		return ObjectKey{Resource: path, Name: parts[0]}, nil
	case len(parts) == 2 && parts[0] != "" && parts[1] != "":
		return ObjectKey{Resource: path, Namespace: parts[0], Name: parts[1]}, nil
	}
	return ObjectKey{}, fmt.Errorf("etcd key %q has an unexpected shape", key)
}

// TopSegment returns the first path segment of key after the prefix
// ("secrets" for <prefix>/secrets/ns/name, the group for a custom
// resource), or "" when key is not under the prefix.
func (l Layout) TopSegment(key string) string {
	rest, ok := strings.CutPrefix(key, l.All())
	if !ok {
		return ""
	}
	seg, _, _ := strings.Cut(rest, "/")
	return seg
}
