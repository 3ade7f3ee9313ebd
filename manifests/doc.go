// Package manifests holds no code: it is the home of the deployment files
// (static pod, systemd unit and its drop-ins, sysusers.d and tmpfiles.d
// files, EncryptionConfiguration, rotation CronJob) and of the tests that
// check them against each other and against systemd's own analysis.
package manifests
