// Package plugin is the KMS v2 gRPC service kube-apiserver calls: it
// validates every request and reply against the contract in k8s.io/kms,
// serves Status from cached state, routes Encrypt and Decrypt to a
// providers.Provider, maps provider errors to gRPC codes in one place, and
// owns the socket, health endpoints and metrics.
//
// The service never imports a backend: it sees only the providers contract.
package plugin
