// Package harness runs a real Kubernetes control plane on loopback for
// end-to-end tests and the demo: one etcd, N kube-apiservers built from the
// pinned modules in e2e/tools, and one kms-plugin process per apiserver (each
// with its own socket, all sharing one provider state, as on a real HA control
// plane). It exists because the behaviour that matters (what lands in etcd,
// how the apiserver caches seeds, when it notices a new key_id) lives in the
// apiserver, and no fake reproduces it faithfully.
//
// The core (Launch, Cluster, Close) needs no *testing.T, so the demo program
// drives the same code as the tests; Start is the thin testing wrapper that
// registers cleanup and prints every process's log tail when a test fails.
//
// Binaries: the control plane comes from $KMS_E2E_BIN or e2e/tools/build.sh
// (which builds only what is missing); kms-plugin and kmsctl come from
// $KMS_PLUGIN_BIN_DIR or are built from this repository once per process,
// with the e2ehooks build tag so kmsctl has its test-only crash hooks.
//
// The harness reads etcd through package rotation/etcdlayout only (the key
// layout under Options.EtcdPrefix and the stored-value decoding), never the
// orchestrator it tests. Tests can reshape the cluster while it runs:
// APIServer.Reconfigure installs an EncryptionConfiguration rendered from
// KMS, Identity and AESCBC entries and restarts that apiserver, and
// StartSpareEtcd starts a second, empty etcd to point a tool at.
// Test binaries should call RunTests from TestMain so that build is removed
// afterwards.
//
// A Cluster is safe for use by one test at a time; its processes are stopped
// and its temp folder removed by Close, also when the test failed.
package harness
