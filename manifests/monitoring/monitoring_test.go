package monitoring

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	kmsapi "k8s.io/kms/apis/v2"
	"sigs.k8s.io/yaml"

	"github.com/kms-v2/kms-plugin/plugin"
	"github.com/kms-v2/kms-plugin/providers"
)

// promtoolEnv names the promtool binary; `make unit` sets it to the pinned
// build it installs (PROMTOOL_VERSION in the Makefile).
const promtoolEnv = "KMS_PROMTOOL"

// promtool returns the promtool to run: $KMS_PROMTOOL, else one on PATH.
// A missing promtool fails the test: the rules would otherwise ship
// untested.
func promtool(t *testing.T) string {
	t.Helper()
	if p := os.Getenv(promtoolEnv); p != "" {
		if _, err := os.Stat(p); err != nil {
			t.Fatalf("%s=%s: %v; run `make unit`, which installs it", promtoolEnv, p, err)
		}
		return p
	}
	p, err := exec.LookPath("promtool")
	if err != nil {
		t.Fatalf("promtool not found: run `make unit` (it installs the pinned promtool and sets %s), or set %s to a promtool binary", promtoolEnv, promtoolEnv)
	}
	return p
}

// runPromtool runs promtool with args in dir and returns its output.
func runPromtool(t *testing.T, dir string, args ...string) (string, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, promtool(t), args...)
	cmd.Dir = dir
	out, err := cmd.CombinedOutput()
	return string(out), err
}

// ruleSpec is the part of the PrometheusRule the tests read: its spec is
// a plain Prometheus rule file.
type ruleSpec struct {
	Kind string `json:"kind"`
	Spec struct {
		Groups []struct {
			Name  string `json:"name"`
			Rules []struct {
				Alert       string            `json:"alert"`
				Record      string            `json:"record"`
				Expr        string            `json:"expr"`
				Annotations map[string]string `json:"annotations"`
			} `json:"rules"`
		} `json:"groups"`
	} `json:"spec"`
}

// readRules parses prometheusrule.yaml and returns it and its spec as a
// rule file's bytes.
func readRules(t *testing.T) (ruleSpec, []byte) {
	t.Helper()
	b, err := os.ReadFile("prometheusrule.yaml")
	if err != nil {
		t.Fatal(err)
	}
	var raw struct {
		Kind string          `json:"kind"`
		Spec json.RawMessage `json:"spec"`
	}
	if err := yaml.Unmarshal(b, &raw); err != nil {
		t.Fatalf("prometheusrule.yaml: %v", err)
	}
	var rs ruleSpec
	if err := yaml.Unmarshal(b, &rs); err != nil {
		t.Fatal(err)
	}
	if rs.Kind != "PrometheusRule" || len(raw.Spec) == 0 {
		t.Fatalf("prometheusrule.yaml: kind %q with spec of %d bytes; want a PrometheusRule", rs.Kind, len(raw.Spec))
	}
	// JSON is YAML: the spec is written as promtool reads it.
	return rs, raw.Spec
}

// TestAlertRules runs `promtool check rules` on the PrometheusRule's spec,
// then every rule unit test in tests/ against it.
func TestAlertRules(t *testing.T) {
	_, spec := readRules(t)
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "rules.yaml"), spec, 0o600); err != nil {
		t.Fatal(err)
	}
	if out, err := runPromtool(t, dir, "check", "rules", "rules.yaml"); err != nil {
		t.Fatalf("promtool check rules: %v\n%s", err, out)
	}
	tests, err := filepath.Glob(filepath.Join("tests", "*.yaml"))
	if err != nil || len(tests) == 0 {
		t.Fatalf("no rule tests in tests/ (%v)", err)
	}
	for _, src := range tests {
		name := filepath.Base(src)
		t.Run(name, func(t *testing.T) {
			b, err := os.ReadFile(src)
			if err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(filepath.Join(dir, name), b, 0o600); err != nil {
				t.Fatal(err)
			}
			if out, err := runPromtool(t, dir, "test", "rules", name); err != nil {
				t.Fatalf("promtool test rules %s: %v\n%s", src, err, out)
			}
		})
	}
}

// TestEveryAlertIsTested: each alert has a runbook and annotations, and
// the rule tests expect it both to fire and to stay silent somewhere.
func TestEveryAlertIsTested(t *testing.T) {
	rs, _ := readRules(t)
	fires, silent := alertTestCases(t)
	for _, g := range rs.Spec.Groups {
		for _, r := range g.Rules {
			if r.Alert == "" {
				continue
			}
			for _, a := range []string{"summary", "description", "runbook_url"} {
				if r.Annotations[a] == "" {
					t.Errorf("alert %s: no %s annotation", r.Alert, a)
				}
			}
			if !strings.HasPrefix(r.Annotations["runbook_url"], "docs/operations.md#") {
				t.Errorf("alert %s: runbook_url %q, want a docs/operations.md# anchor", r.Alert, r.Annotations["runbook_url"])
			}
			if !fires[r.Alert] || !silent[r.Alert] {
				t.Errorf("alert %s: tested firing %v, tested silent %v; want both", r.Alert, fires[r.Alert], silent[r.Alert])
			}
		}
	}
}

// alertTestCases reads tests/*.yaml: which alerts some case expects to
// fire, and which some case expects not to.
func alertTestCases(t *testing.T) (fires, silent map[string]bool) {
	t.Helper()
	fires, silent = map[string]bool{}, map[string]bool{}
	files, _ := filepath.Glob(filepath.Join("tests", "*.yaml"))
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		var doc struct {
			Tests []struct {
				AlertRuleTest []struct {
					Alertname string            `json:"alertname"`
					ExpAlerts []json.RawMessage `json:"exp_alerts"`
				} `json:"alert_rule_test"`
			} `json:"tests"`
		}
		if err := yaml.Unmarshal(b, &doc); err != nil {
			t.Fatalf("%s: %v", f, err)
		}
		for _, tc := range doc.Tests {
			for _, a := range tc.AlertRuleTest {
				if len(a.ExpAlerts) > 0 {
					fires[a.Alertname] = true
				} else {
					silent[a.Alertname] = true
				}
			}
		}
	}
	return fires, silent
}

// dashboard is the part of dashboard.json the tests read.
type dashboard struct {
	SchemaVersion int `json:"schemaVersion"`
	Templating    struct {
		List []struct {
			Name  string `json:"name"`
			Type  string `json:"type"`
			Query any    `json:"query"`
		} `json:"list"`
	} `json:"templating"`
	Panels []panel `json:"panels"`
}

type panel struct {
	ID         int                      `json:"id"`
	Title      string                   `json:"title"`
	Type       string                   `json:"type"`
	Datasource *dsRef                   `json:"datasource"`
	Targets    []target                 `json:"targets"`
	Panels     []panel                  `json:"panels"`
	GridPos    struct{ X, Y, W, H int } `json:"gridPos"`
}

type target struct {
	Expr       string `json:"expr"`
	Datasource *dsRef `json:"datasource"`
}

type dsRef struct {
	Type string `json:"type"`
	UID  string `json:"uid"`
}

func readDashboard(t *testing.T) dashboard {
	t.Helper()
	b, err := os.ReadFile("dashboard.json")
	if err != nil {
		t.Fatal(err)
	}
	var d dashboard
	dec := json.NewDecoder(strings.NewReader(string(b)))
	if err := dec.Decode(&d); err != nil {
		t.Fatalf("dashboard.json: %v", err)
	}
	return d
}

// allPanels flattens rows' panels.
func allPanels(ps []panel) []panel {
	var out []panel
	for _, p := range ps {
		out = append(out, p)
		out = append(out, allPanels(p.Panels)...)
	}
	return out
}

// TestDashboardShape: a schema Grafana 10/11 imports, a datasource
// template variable every panel and query uses (so the dashboard works
// with any Prometheus data source name), unique panel ids, and a query
// in every panel.
func TestDashboardShape(t *testing.T) {
	d := readDashboard(t)
	if d.SchemaVersion < 36 {
		t.Errorf("schemaVersion %d; want 36 or later (datasource references by uid)", d.SchemaVersion)
	}
	hasVar := slices.ContainsFunc(d.Templating.List, func(v struct {
		Name  string `json:"name"`
		Type  string `json:"type"`
		Query any    `json:"query"`
	}) bool {
		return v.Name == "datasource" && v.Type == "datasource" && v.Query == "prometheus"
	})
	if !hasVar {
		t.Error("no datasource template variable of type prometheus")
	}
	ids := map[int]string{}
	for _, p := range allPanels(d.Panels) {
		if prev, dup := ids[p.ID]; dup {
			t.Errorf("panel id %d used by %q and %q", p.ID, prev, p.Title)
		}
		ids[p.ID] = p.Title
		if p.Type == "row" {
			continue
		}
		if p.Datasource == nil || p.Datasource.UID != "${datasource}" {
			t.Errorf("panel %q: datasource %+v, want uid ${datasource}", p.Title, p.Datasource)
		}
		if len(p.Targets) == 0 {
			t.Errorf("panel %q has no query", p.Title)
		}
		for _, tg := range p.Targets {
			if tg.Expr == "" || tg.Datasource == nil || tg.Datasource.UID != "${datasource}" {
				t.Errorf("panel %q: a target with expr %q and datasource %+v; want both, uid ${datasource}", p.Title, tg.Expr, tg.Datasource)
			}
		}
	}
}

// dashboardExprs returns every panel query, by panel title.
func dashboardExprs(t *testing.T) map[string][]string {
	t.Helper()
	out := map[string][]string{}
	for _, p := range allPanels(readDashboard(t).Panels) {
		for _, tg := range p.Targets {
			if tg.Expr != "" {
				out[p.Title] = append(out[p.Title], tg.Expr)
			}
		}
	}
	return out
}

// grafanaVars are the dashboard variables as a query would see them
// expanded, so promtool can parse the expressions.
var grafanaVars = strings.NewReplacer("$__rate_interval", "5m", "${node}", ".*", "$node", ".*")

// TestDashboardQueriesParse: every panel query is valid PromQL, checked
// by promtool as a recording rule once Grafana's variables are expanded.
func TestDashboardQueriesParse(t *testing.T) {
	type rule struct {
		Record string `json:"record"`
		Expr   string `json:"expr"`
	}
	var rules []rule
	exprs := dashboardExprs(t)
	for _, title := range slices.Sorted(maps.Keys(exprs)) {
		for _, e := range exprs[title] {
			rules = append(rules, rule{Record: fmt.Sprintf("dashboard:query_%d", len(rules)), Expr: grafanaVars.Replace(e)})
		}
	}
	b, err := json.Marshal(map[string]any{"groups": []any{map[string]any{"name": "dashboard", "rules": rules}}})
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "dashboard-rules.yaml"), b, 0o600); err != nil {
		t.Fatal(err)
	}
	if out, err := runPromtool(t, dir, "check", "rules", "dashboard-rules.yaml"); err != nil {
		t.Fatalf("a dashboard query does not parse: %v\n%s", err, out)
	}
}

// externalMetrics are the metrics the rules and dashboard read from other
// exporters: Prometheus itself, kube-apiserver (KMS v2, alpha) and
// kube-state-metrics.
var externalMetrics = map[string]bool{
	"up": true,
	"apiserver_envelope_encryption_key_id_hash_status_last_timestamp_seconds": true,
	"kube_cronjob_status_last_successful_time":                                true,
	"kube_cronjob_created": true,
}

// TestQueriesUseKnownMetrics: every metric the alert rules and the
// dashboard query is one the plugin registers (see pluginMetrics) or one
// of externalMetrics, so a renamed metric cannot leave a panel or an
// alert silently empty.
func TestQueriesUseKnownMetrics(t *testing.T) {
	known := pluginMetrics(t)
	for name := range externalMetrics {
		known[name] = true
	}
	exprs := dashboardExprs(t)
	rs, _ := readRules(t)
	for _, g := range rs.Spec.Groups {
		for _, r := range g.Rules {
			exprs["alert "+r.Alert] = append(exprs["alert "+r.Alert], r.Expr)
		}
	}
	used := map[string]bool{}
	for where, es := range exprs {
		for _, e := range es {
			names := metricNames(e)
			if len(names) == 0 {
				t.Errorf("%s: no metric found in %q", where, e)
			}
			for _, n := range names {
				used[n] = true
				if !known[n] {
					t.Errorf("%s: metric %s is neither registered by the plugin nor a known apiserver, kube-state-metrics or Prometheus metric", where, n)
				}
			}
		}
	}
	for _, want := range []string{"kms_plugin_healthy", "kms_plugin_build_info", "kms_plugin_primary_key_created_timestamp_seconds",
		"kms_plugin_provider_cache_lookups_total", "kms_plugin_provider_breaker_state", "kms_plugin_log_lines_dropped_total"} {
		if !used[want] {
			t.Errorf("no panel or alert uses %s", want)
		}
	}
}

// pluginMetrics returns the names a plugin's /metrics can carry, with a
// histogram's _bucket, _sum and _count series: its registry as
// cmd/kms-plugin builds it, after a Status call and with a provider that
// reports every stat.
func pluginMetrics(t *testing.T) map[string]bool {
	t.Helper()
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	m := plugin.NewMetrics(reg)
	m.SetBuildInfo("v0", "c", "go", "off")
	svc, err := plugin.New(plugin.Options{Provider: everyStat{}, Metrics: m})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := svc.Status(context.Background(), &kmsapi.StatusRequest{}); err != nil {
		t.Fatal(err)
	}
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	names := map[string]bool{}
	for _, mf := range mfs {
		n := mf.GetName()
		names[n] = true
		if mf.GetType().String() == "HISTOGRAM" {
			names[n+"_bucket"], names[n+"_sum"], names[n+"_count"] = true, true, true
		}
	}
	return names
}

// everyStat is a provider that reports every stat providers.Stats has.
type everyStat struct{}

func (everyStat) Encrypt(context.Context, []byte) (providers.Sealed, error) {
	return providers.Sealed{}, errors.New("not used")
}
func (everyStat) Decrypt(context.Context, providers.Sealed) ([]byte, error) {
	return nil, errors.New("not used")
}
func (everyStat) PrimaryKeyID(context.Context) (string, error) { return "fake:k/1", nil }
func (everyStat) Owns(string) bool                             { return true }
func (everyStat) Check(context.Context) error                  { return nil }
func (everyStat) Close() error                                 { return nil }
func (everyStat) Stats() providers.Stats {
	return providers.Stats{
		PrimaryCreated: time.Unix(1, 0),
		Caches:         []providers.CacheStats{{Cache: providers.CacheUnwrap}},
		Breaker:        providers.BreakerClosed,
	}
}

// PromQL words that look like metric names: functions are followed by
// "(" and dropped anyway; these are aggregation modifiers, operators and
// literals.
var promqlWords = map[string]bool{
	"by": true, "without": true, "on": true, "ignoring": true, "group_left": true, "group_right": true,
	"and": true, "or": true, "unless": true, "bool": true, "offset": true, "inf": true, "nan": true,
}

var (
	quoted     = regexp.MustCompile(`"(?:[^"\\]|\\.)*"`)
	matchers   = regexp.MustCompile(`\{[^}]*\}`)
	ranges     = regexp.MustCompile(`\[[^\]]*\]`)
	groupings  = regexp.MustCompile(`\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)`)
	identifier = regexp.MustCompile(`[a-zA-Z_:][a-zA-Z0-9_:]*(\s*\()?`)
	numberLike = regexp.MustCompile(`\b\d+(?:\.\d+)?(?:e[+-]?\d+)?[a-z]*\b`)
)

// metricNames returns the metric names in a PromQL expression: what is
// left once strings, label matchers, ranges, grouping clauses, numbers
// and function calls are removed. (The Prometheus parser would do it
// exactly, but is a large dependency for the plugin module; the tests
// prove this on every expression we ship, and promtool parses them all.)
func metricNames(expr string) []string {
	e := grafanaVars.Replace(expr)
	for _, re := range []*regexp.Regexp{quoted, matchers, ranges, groupings, numberLike} {
		e = re.ReplaceAllString(e, " ")
	}
	var out []string
	for _, m := range identifier.FindAllStringSubmatch(e, -1) {
		if m[1] != "" || promqlWords[m[0]] {
			continue // a function call, or a keyword
		}
		out = append(out, m[0])
	}
	return out
}

// TestMetricNames: metricNames finds exactly the metrics of expressions
// shaped like those shipped.
func TestMetricNames(t *testing.T) {
	tests := []struct {
		name string
		expr string
		want []string
	}{
		{"bare", "kms_plugin_healthy == 0", []string{"kms_plugin_healthy"}},
		{"matchers and range", `rate(kms_plugin_requests_total{code!="OK",method=~"Encrypt|Decrypt"}[5m])`, []string{"kms_plugin_requests_total"}},
		{"grouping and quantile", `histogram_quantile(0.99, sum by (le, method) (rate(x_bucket{job="a"}[$__rate_interval])))`, []string{"x_bucket"}},
		{"binary with on", `time() - a > 2 * 86400 unless on (namespace, cronjob) b`, []string{"a", "b"}},
		{"absent", `absent(up{job="kms-plugin"})`, []string{"up"}},
		{"humanized number", "a > 768 * 3600 or b < 1e3", []string{"a", "b"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := metricNames(tt.expr); !slices.Equal(got, tt.want) {
				t.Errorf("metricNames(%q) = %v, want %v", tt.expr, got, tt.want)
			}
		})
	}
}
