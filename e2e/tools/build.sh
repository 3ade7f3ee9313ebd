#!/usr/bin/env bash
# Builds the real control-plane binaries (kube-apiserver,
# kube-controller-manager, kubectl, etcd, etcdctl) from the pinned modules in
# this folder into a cache folder keyed by their versions, building only what
# is missing. Prints the bin folder.
#
# Usage: e2e/tools/build.sh            (KMS_E2E_CACHE overrides the cache root)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here"
k8s_version="$(awk '$1=="k8s.io/kubernetes"{print $2; exit}' go.mod)"
etcd_version="$(awk '$1=="go.etcd.io/etcd/server/v3"{print $2; exit}' go.mod)"
root="${KMS_E2E_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kms-plugin-e2e}"
bin="$root/k8s-${k8s_version}-etcd-${etcd_version}/bin"
mkdir -p "$bin"
build() { # name package
  local name="$1" pkg="$2"
  if [[ -x "$bin/$name" ]]; then return 0; fi
  echo "building $name from $pkg (first time only; kube-apiserver and kube-controller-manager take minutes on a cold cache)" >&2
  # Build to a temp name then rename, so an interrupted build never leaves a
  # half-written binary that looks complete.
  CGO_ENABLED=0 go build -trimpath -o "$bin/.$name.tmp" "$pkg"
  mv "$bin/.$name.tmp" "$bin/$name"
}
build etcd go.etcd.io/etcd/server/v3
build etcdctl go.etcd.io/etcd/etcdctl/v3
build kubectl k8s.io/kubernetes/cmd/kubectl
build kube-apiserver k8s.io/kubernetes/cmd/kube-apiserver
build kube-controller-manager k8s.io/kubernetes/cmd/kube-controller-manager
echo "$bin"
