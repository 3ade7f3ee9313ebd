// Package monitoring holds no code: it is the home of the Prometheus
// Operator objects (PodMonitor, PrometheusRule) and the Grafana dashboard
// for the plugin, and of the tests that run the alert rules through
// promtool's own rule unit tests (tests/*.yaml) and check that the rules
// and the dashboard name only metrics that exist.
package monitoring
