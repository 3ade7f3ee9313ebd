package rotation

import (
	"fmt"
	"strings"

	"k8s.io/apimachinery/pkg/runtime/schema"
)

// Resource is one encrypted resource as both sides see it: the API path the
// rewrite patches through and the etcd prefix the census scans.
type Resource struct {
	// Name is the flag spelling: "secrets", or "<resource>.<version>.<group>".
	Name string
	// GVR addresses the resource through the apiserver.
	GVR schema.GroupVersionResource
	// EtcdPrefix is where kube-apiserver stores it, ending in "/".
	EtcdPrefix string
}

// coreResources are the core-group resources commonly encrypted; they live
// directly under /registry/<resource>/.
var coreResources = map[string]bool{"secrets": true, "configmaps": true}

// ParseResource turns "secrets", "configmaps" or "<resource>.<version>.<group>"
// (a custom resource, stored under /registry/<group>/<resource>/) into a
// Resource. Built-in resources of other groups keep their historical etcd
// paths and are not guessed at.
func ParseResource(s string) (Resource, error) {
	s = strings.TrimSpace(s)
	if coreResources[s] {
		return Resource{Name: s, GVR: schema.GroupVersionResource{Version: "v1", Resource: s}, EtcdPrefix: "/registry/" + s + "/"}, nil
	}
	parts := strings.SplitN(s, ".", 3)
	if len(parts) != 3 || parts[0] == "" || parts[1] == "" || parts[2] == "" {
		return Resource{}, fmt.Errorf("resource %q: want secrets, configmaps or <resource>.<version>.<group> (a custom resource)", s)
	}
	gvr := schema.GroupVersionResource{Group: parts[2], Version: parts[1], Resource: parts[0]}
	return Resource{Name: s, GVR: gvr, EtcdPrefix: "/registry/" + gvr.Group + "/" + gvr.Resource + "/"}, nil
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
		if seen[r.EtcdPrefix] {
			return nil, fmt.Errorf("resource %q given twice", n)
		}
		seen[r.EtcdPrefix] = true
		out = append(out, r)
	}
	return out, nil
}

// etcdResource is the part of the prefix ParseObjectKey expects.
func (r Resource) etcdResource() string {
	return strings.TrimSuffix(strings.TrimPrefix(r.EtcdPrefix, "/registry/"), "/")
}
