// Package socket benchmarks the plugin over its real Unix socket with the
// apiserver's own KMS v2 client, against a floor measured in the same run: a
// bare KMS v2 gRPC server doing standard-library AES-256-GCM with no
// validation, no interceptors and no provider. Run it with `make bench`.
package socket
