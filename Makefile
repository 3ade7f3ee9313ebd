# Two commands set everything up on a fresh machine:
#   make demo   runs a real local control plane (etcd + kube-apiserver) using the plugin
#   make test   installs what the tests need and runs every test (unit, fuzz seeds, e2e)
# and `make ci` (what .ci/run runs) adds module verification, lint, the
# vulnerability scan first, and the tests in
# FIPS 140-only mode last (docs/ci.md, docs/fips.md).

GO        ?= go
BIN       ?= bin
ARGS      ?=
E2E_FLAGS ?= -race -count=1 -timeout 45m
# Packages with tests that need no control plane (everything but the e2e tag).
UNIT_PKGS ?= ./...

export CGO_ENABLED ?= 1

.PHONY: all build test check unit e2e demo bench bench-rotation deps tools clean ci lint fuzz vulncheck modverify release-fips test-fips

all: build

## build: both binaries, stamped with the release version and commit that
## `version` prints (git describe; "dev" outside a git checkout).
VERSION ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
COMMIT  ?= $(shell git rev-parse HEAD 2>/dev/null)$(shell git diff --quiet HEAD -- 2>/dev/null || echo -dirty)
build:
	$(GO) build -ldflags "-X main.version=$(VERSION) -X main.commit=$(COMMIT)" -o $(BIN)/ ./cmd/kms-plugin ./cmd/kmsctl

## release-fips: both binaries built against the frozen Go Cryptographic Module
## FIPS_MODULE (GOFIPS140), into $(BIN)/fips/; such a build defaults to
## GODEBUG=fips140=on. The build info is checked for both (docs/fips.md).
FIPS_MODULE ?= v1.0.0
release-fips:
	@test -f "$$($(GO) env GOROOT)/lib/fips140/$(FIPS_MODULE).zip" || ls "$$($(GO) env GOROOT)/lib/fips140/" | grep -q '^$(FIPS_MODULE)-.*\.zip$$' || { echo "this Go toolchain has no FIPS module snapshot $(FIPS_MODULE) in GOROOT/lib/fips140" >&2; exit 1; }
	GOFIPS140=$(FIPS_MODULE) $(GO) build -o $(BIN)/fips/ ./cmd/kms-plugin ./cmd/kmsctl
	@for b in kms-plugin kmsctl; do \
	  info="$$($(GO) version -m $(BIN)/fips/$$b)"; \
	  echo "$$info" | grep -q 'GOFIPS140=$(FIPS_MODULE)' || { echo "$(BIN)/fips/$$b: built without GOFIPS140=$(FIPS_MODULE)" >&2; exit 1; }; \
	  echo "$$info" | grep -q 'DefaultGODEBUG=.*fips140=on' || { echo "$(BIN)/fips/$$b: FIPS 140-3 mode is not its default" >&2; exit 1; }; \
	  echo "$(BIN)/fips/$$b: GOFIPS140=$(FIPS_MODULE), default GODEBUG fips140=on"; \
	done

## test-fips: the unit and contract tests (not e2e), built against the frozen
## FIPS module and run under GODEBUG=fips140=only, where non-approved
## cryptography fails. Without -race: make unit is the race pass. Tests that
## drive kube-apiserver's own envelope code skip there (docs/fips.md).
test-fips: deps
	KMS_PROMTOOL="$(PROMTOOL)" GOFIPS140=$(FIPS_MODULE) GODEBUG=fips140=only $(GO) test -count=1 $(UNIT_PKGS)

## test: every test, with the tools it needs installed first.
test: deps check unit e2e

## deps: SoftHSM2, and a software TPM exposed as a PKCS#11 token, for the PKCS#11 tests, and
## systemd-analyze (package systemd) for the systemd unit's test in manifests/
## (apt-get when root and missing; one update, one install of whatever is missing).
TPM_PKGS = swtpm swtpm-tools tpm2-tools tpm2-abrmd libtss2-tcti-tabrmd0 libtpm2-pkcs11-1 libtpm2-pkcs11-tools dbus sqlite3
deps:
	@missing=""; \
	command -v softhsm2-util >/dev/null 2>&1 || missing="softhsm2"; \
	tpm=1; for c in swtpm tpm2-abrmd tpm2_ptool dbus-daemon dbus-send; do command -v $$c >/dev/null 2>&1 || tpm=; done; \
	ls /usr/lib/*/pkcs11/libtpm2_pkcs11.so /usr/lib64/pkcs11/libtpm2_pkcs11.so /usr/lib/pkcs11/libtpm2_pkcs11.so 2>/dev/null | grep -q . || tpm=; \
	ls /usr/lib/*/libtss2-tcti-tabrmd.so.0 /usr/lib64/libtss2-tcti-tabrmd.so.0 /usr/lib/libtss2-tcti-tabrmd.so.0 2>/dev/null | grep -q . || tpm=; \
	[ -n "$$tpm" ] || missing="$$missing $(TPM_PKGS)"; \
	command -v systemd-analyze >/dev/null 2>&1 || missing="$$missing systemd"; \
	missing="$${missing# }"; [ -z "$$missing" ] && exit 0; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing $$missing (PKCS#11 tests use SoftHSM2 and a software TPM as tokens; the unit test uses systemd-analyze)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	else \
	  echo "missing test dependencies: install them (Debian/Ubuntu: sudo apt-get install -y $$missing) and rerun" >&2; exit 1; \
	fi

## tools: the real kube-apiserver, kubectl, etcd and etcdctl, built once from pinned modules into a cache.
tools:
	@e2e/tools/build.sh >/dev/null

## ci: what .ci/run runs: the module checks, lint, the vulnerability scan, every test,
## then the unit and contract tests again in FIPS 140-only mode (docs/fips.md).
ci: modverify lint vulncheck
	$(MAKE) test
	$(MAKE) test-fips

# Pinned analysis tools, installed through the Go module proxy into a cache
# keyed by version (like `tools`), only when missing.
GOLANGCI_LINT_VERSION ?= v2.15.0
GOVULNCHECK_VERSION   ?= v1.9.0
# The Go vulnerability database as the golang.org/x/vulndb module (its
# data/osv folder) at a pinned commit: govulncheck reads it offline.
VULNDB_VERSION        ?= v0.0.0-20261105234957-e22db6528018
CI_CACHE              ?= $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/kms-plugin-ci
GOLANGCI_LINT = $(CI_CACHE)/golangci-lint-$(GOLANGCI_LINT_VERSION)/golangci-lint
GOVULNCHECK   = $(CI_CACHE)/govulncheck-$(GOVULNCHECK_VERSION)/govulncheck
INDEXDB       = $(CI_CACHE)/indexdb-$(VULNDB_VERSION)/indexdb
VULNDB        = $(CI_CACHE)/vulndb-$(VULNDB_VERSION)

# promtool, Prometheus's rule checker and rule unit test runner, for the
# alert rules in manifests/monitoring (module v0.316.0 is Prometheus 3.16).
PROMTOOL_VERSION      ?= v0.316.0
PROMTOOL = $(CI_CACHE)/promtool-$(PROMTOOL_VERSION)/promtool
$(PROMTOOL):
	GOBIN="$(@D)" $(GO) install github.com/prometheus/prometheus/cmd/promtool@$(PROMTOOL_VERSION)
# Declared here, where PROMTOOL is set: a prerequisite is expanded when read.
unit test-fips: $(PROMTOOL)

$(GOLANGCI_LINT):
	GOBIN="$(@D)" $(GO) install github.com/golangci/golangci-lint/v2/cmd/golangci-lint@$(GOLANGCI_LINT_VERSION)
$(GOVULNCHECK):
	GOBIN="$(@D)" $(GO) install golang.org/x/vuln/cmd/govulncheck@$(GOVULNCHECK_VERSION)
$(INDEXDB):
	GOBIN="$(@D)" $(GO) install golang.org/x/vulndb/cmd/indexdb@$(VULNDB_VERSION)
# The database in the layout govulncheck's -db file:// reads (index/db.json,
# index/modules.json, ID/<id>.json), built from the module's OSV files.
$(VULNDB)/index/db.json: | $(INDEXDB)
	@src="$$($(GO) mod download -json golang.org/x/vulndb@$(VULNDB_VERSION) | sed -n 's/^\t"Dir": "\(.*\)",$$/\1/p')"; \
	test -d "$$src/data/osv" || { echo "golang.org/x/vulndb@$(VULNDB_VERSION) has no data/osv" >&2; exit 1; }; \
	rm -rf "$(VULNDB).tmp" && "$(INDEXDB)" -vulns "$$src/data/osv" -out "$(VULNDB).tmp" && rm -rf "$(VULNDB)" && mv "$(VULNDB).tmp" "$(VULNDB)"

## lint: the curated golangci-lint set (.golangci.yml), for the default build and the e2e tags.
lint: $(GOLANGCI_LINT)
	$(GOLANGCI_LINT) run ./...
	$(GOLANGCI_LINT) run --build-tags e2e,e2ehooks ./...

## vulncheck: govulncheck against the pinned offline database; fails on a reachable
## vulnerability that .ci/vulncheck-allow does not list with a reason.
vulncheck: $(GOVULNCHECK) $(VULNDB)/index/db.json
	.ci/vulncheck "$(GOVULNCHECK)" "file://$(VULNDB)"

## modverify: the module cache holds exactly what go.sum names (main and e2e/tools modules).
modverify:
	$(GO) mod verify
	cd e2e/tools && $(GO) mod verify

## fuzz: every fuzz target for FUZZTIME each (go test fuzzes one target per run).
## CI fuzzes 5 s per target: about 2 minutes for the 13 targets, builds included.
FUZZTIME    ?= 10s
CI_FUZZTIME ?= 5s
fuzz:
	GO="$(GO)" .ci/fuzz $(FUZZTIME)

## check: formatting, vet and module tidiness leave the tree unchanged.
check:
	@out="$$(gofmt -l $$(git ls-files '*.go'))"; if [ -n "$$out" ]; then echo "gofmt needed:" >&2; echo "$$out" >&2; exit 1; fi
	$(GO) vet ./...
	$(GO) vet -tags e2e ./e2e/...
	$(GO) mod tidy -diff
	cd e2e/tools && $(GO) mod tidy -diff

## unit: the product's tests, and the kubeadm patch checked with kubeadm's own
## types (in e2e/tools, the module that may depend on k8s.io/kubernetes);
## manifests/monitoring's alert rule tests run the pinned promtool (installed
## into the cache on first use, see PROMTOOL).
unit:
	KMS_PROMTOOL="$(PROMTOOL)" $(GO) test -race -count=1 $(UNIT_PKGS)
	cd e2e/tools && $(GO) test -count=1 ./kubeadmcheck/

e2e: tools
	KMS_E2E_BIN="$$(e2e/tools/build.sh)" $(GO) test -tags e2e $(E2E_FLAGS) ./e2e/...

## demo: etcd + kube-apiserver + the plugin with a fresh dev keyset; ARGS=--once exits after the walkthrough.
demo: tools
	KMS_E2E_BIN="$$(e2e/tools/build.sh)" $(GO) run ./e2e/demo $(ARGS)

## bench: the plugin over its socket against a bare gRPC floor (same run), and provider-level benchmarks.
bench: deps
	$(GO) test -run '^$$' -bench . -benchtime 1x ./e2e/bench/socket
	$(GO) test -run '^$$' -bench 'ProviderRoundTrip|TokenAESGCM' ./providers/pkcs11/
	$(GO) test -run '^$$' -bench TPMDecryptStorm -benchtime 1x ./providers/pkcs11/
	$(GO) test -run '^$$' -bench DecryptStorm -benchtime 1x ./providers/azurekv/

## bench-rotation: issue 13's table on a real control plane: kmsctl rotate against
## StorageVersionMigration and kubectl get|replace, quiet and busy, saturated, census
## against raw etcd reads, and 10k against 100k secrets (about 45 min on 2 cores).
## ARGS overrides, e.g. ARGS="-secrets 2000 -scale-to 0" for a quick look (not written to docs).
BENCH_ROTATION_ARGS ?= -secrets 10000 -scale-to 100000
bench-rotation: tools
	KMS_E2E_BIN="$$(e2e/tools/build.sh)" $(GO) run ./e2e/bench/rotation $(or $(ARGS),$(BENCH_ROTATION_ARGS))

clean:
	rm -rf $(BIN)

## image: the release image as an OCI image layout in $(IMAGE_OUT), built without a container
## engine from Debian packages and the two binaries (docs/image.md); amd64 only.
IMAGE_OUT     ?= $(BIN)/image
IMAGE_VERSION ?= $(VERSION)
.PHONY: image image-debs
image:
	$(GO) run ./build/image -out $(IMAGE_OUT) -version $(IMAGE_VERSION)

## image-debs: download the image's Debian packages into the cache (apt-get download; as root
## it runs apt-get update once if needed). KMS_IMAGE_DEBS overrides the cache directory.
image-debs:
	@command -v apt-get >/dev/null 2>&1 || { echo "image-debs: apt-get not found: the image is built from Debian packages; run this on Debian/Ubuntu or put the .deb files in KMS_IMAGE_DEBS" >&2; exit 1; }
	$(GO) run ./build/image -fetch-only
