package rotation

import (
	"context"
	"fmt"
	"strings"

	"k8s.io/apimachinery/pkg/runtime/schema"
)

// Resource is one encrypted resource as both sides see it: the API path the
// rewrite patches through and the etcd path the census scans.
type Resource struct {
	// Name is the flag spelling: "secrets", or "<resource>.<version>.<group>".
	Name string
	// GVR addresses the resource through the apiserver.
	GVR schema.GroupVersionResource
	// Path is how etcd keys spell the resource under the prefix:
	// "secrets", or "<group>/<resource>" for a custom resource.
	Path string
}

// coreResources are the core-group resources commonly encrypted; their etcd
// path is their plain name.
var coreResources = map[string]bool{"secrets": true, "configmaps": true}

// ParseResource turns "secrets", "configmaps" or "<resource>.<version>.<group>"
// (a custom resource, stored under <prefix>/<group>/<resource>/) into a
// Resource. Built-in resources of other groups keep historical etcd paths
// and are not guessed at.
func ParseResource(s string) (Resource, error) {
	s = strings.TrimSpace(s)
	if coreResources[s] {
		return Resource{Name: s, GVR: schema.GroupVersionResource{Version: "v1", Resource: s}, Path: s}, nil
	}
	parts := strings.SplitN(s, ".", 3)
	if len(parts) != 3 || !resourcePart(parts[0]) || !resourcePart(parts[1]) || !resourcePart(parts[2]) {
		return Resource{}, fmt.Errorf("resource %q: want secrets, configmaps or <resource>.<version>.<group> (a custom resource)", s)
	}
	gvr := schema.GroupVersionResource{Group: parts[2], Version: parts[1], Resource: parts[0]}
	return Resource{Name: s, GVR: gvr, Path: gvr.Group + "/" + gvr.Resource}, nil
}

// resourcePart reports whether s can be one part of a custom resource's
// name: non-empty, and without a "/" (which would move the resource's etcd
// path to another shape) or a space or control character.
func resourcePart(s string) bool {
	return s != "" && !strings.ContainsFunc(s, func(r rune) bool { return r == '/' || r <= ' ' || r == 0x7f })
}

// ParseResources parses a list of resource names, refusing duplicates.
func ParseResources(names []string) ([]Resource, error) {
	if len(names) == 0 {
		return nil, fmt.Errorf("no resources given")
	}
	seen := map[string]bool{}
	var out []Resource
	for _, n := range names {
		r, err := ParseResource(n)
		if err != nil {
			return nil, err
		}
		if seen[r.Path] {
			return nil, fmt.Errorf("resource %q given twice", n)
		}
		seen[r.Path] = true
		out = append(out, r)
	}
	return out, nil
}

// configName is how an EncryptionConfiguration names the resource:
// "secrets", or "<resource>.<group>".
func (r Resource) configName() string {
	if r.GVR.Group == "" {
		return r.GVR.Resource
	}
	return r.GVR.Resource + "." + r.GVR.Group
}

func resourceNamed(rs []Resource, name string) (Resource, bool) {
	for _, r := range rs {
		if r.Name == name {
			return r, true
		}
	}
	return Resource{}, false
}

// DefaultResources are the resources to rotate when none are named: what
// cfg encrypts, else every resource etcd holds KMS v2 values of. It is an
// error when neither names anything (before adoption, nothing is under
// KMS v2 yet) or when etcd names a resource kmsctl cannot address.
func DefaultResources(ctx context.Context, e Etcd, cfg *EncryptionConfig) ([]Resource, error) {
	if cfg != nil {
		names, err := cfg.Resources()
		if err != nil {
			return nil, err
		}
		if len(names) == 0 {
			return nil, fmt.Errorf("--encryption-config %s encrypts no resource: name the resources with --resources", cfg.Path)
		}
		return ParseResources(names)
	}
	paths, err := KMSv2Resources(ctx, e)
	if err != nil {
		return nil, err
	}
	if len(paths) == 0 {
		return nil, fmt.Errorf("%s holds no KMS v2 value under %s, so nothing says which resources are encrypted: give --resources or --encryption-config", e.Store.Describe(), e.Layout.All())
	}
	for _, p := range paths {
		if !coreResources[p] {
			return nil, fmt.Errorf("%s holds KMS v2 values under %s: name that resource with --resources (<resource>.<version>.<group>), or give --encryption-config", e.Store.Describe(), e.Layout.ResourcePrefix(p))
		}
	}
	return ParseResources(paths)
}
