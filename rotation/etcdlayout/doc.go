// Package etcdlayout knows how kube-apiserver lays out objects in etcd: the
// key of every object (under --etcd-prefix, "/registry" by default) and the
// format of every stored value (KMS v2 envelope, another encryption
// provider's envelope, or plaintext). It reads etcd, page by page and never
// writing, through a small Store interface.
//
// It is the one place in the tree that spells the default prefix, so that
// the census, the stale scan, the reference scan, the canary and the test
// harness all read the same keys, and a cluster started with another
// --etcd-prefix is read correctly once the prefix is given. It does not
// import the rotation orchestrator; the orchestrator and the e2e harness
// both import it.
package etcdlayout
