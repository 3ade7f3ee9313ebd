//go:build tools

// Package tools pins the real control-plane binaries (kube-apiserver,
// kube-controller-manager, kubectl, etcd, etcdctl) that the e2e harness and
// `make demo` build from source. It is a separate module so the product itself
// never depends on k8s.io/kubernetes.
package tools

import (
	_ "go.etcd.io/etcd/etcdctl/v3"
	_ "go.etcd.io/etcd/server/v3"
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kubectl"
)
