// Package kubeadmcheck holds no code: its test checks the shipped kubeadm
// patch (manifests/kubeadm/cluster-configuration.yaml) with kubeadm's own
// v1beta4 types, defaulting and validation, and renders the kube-apiserver
// static pod kubeadm would write from it. It lives in the e2e/tools module
// because that module already depends on k8s.io/kubernetes; the product
// module never does.
package kubeadmcheck
