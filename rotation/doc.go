// Package rotation is the key rotation orchestrator as a library: it decodes
// how kube-apiserver stored each object in etcd (the census), rewrites stale
// objects through the apiservers, and gates key retirement on proof from etcd
// that no object still uses the old key. cmd/kmsctl is its front end.
//
// It talks to apiservers (client-go) and etcd (clientv3) and to key providers
// through package providers; it never imports the gRPC service.
package rotation
