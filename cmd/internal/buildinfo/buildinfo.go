// Package buildinfo describes the running binary: its release version, the
// commit it was built from, the Go toolchain and whether the Go
// Cryptographic Module runs in FIPS 140-3 mode. Both kms-plugin and kmsctl
// print it with `version`, so an operator can tell which build runs where.
package buildinfo

import (
	"crypto/fips140"
	"fmt"
	"io"
	"runtime"
	"runtime/debug"
)

// Info is what `version` prints. Its JSON form is the `-o json` output.
type Info struct {
	Version string `json:"version"`
	// Commit is the VCS revision, with "-dirty" appended when the work tree
	// had uncommitted changes; "unknown" when the build recorded none.
	Commit    string `json:"commit"`
	GoVersion string `json:"goVersion"`
	// FIPS reports crypto/fips140.Enabled().
	FIPS bool `json:"fips"`
	// FIPSMode is the GODEBUG fips140 setting in effect: "off", "on" or
	// "only" (crypto/fips140.Enforced: non-approved algorithms are refused).
	FIPSMode string `json:"fipsMode"`
	// FIPSModule is the Go Cryptographic Module version, "latest" unless
	// built against a frozen module with GOFIPS140.
	FIPSModule string `json:"fipsModule"`
}

// Get returns the running binary's Info. version is the value set with
// -ldflags "-X main.version=..."; "dev" or empty falls back to the module
// version recorded by `go install`, when there is one. commit likewise
// comes from -X main.commit, else from the build's vcs.revision.
func Get(version, commit string) Info {
	return get(version, commit, debug.ReadBuildInfo)
}

func get(version, commit string, read func() (*debug.BuildInfo, bool)) Info {
	in := Info{Version: version, Commit: commit, GoVersion: runtime.Version(), FIPS: fips140.Enabled()}
	bi, ok := read()
	if ok {
		if (in.Version == "" || in.Version == "dev") && bi.Main.Version != "" && bi.Main.Version != "(devel)" {
			in.Version = bi.Main.Version
		}
		if in.Commit == "" {
			var rev string
			dirty := false
			for _, s := range bi.Settings {
				switch s.Key {
				case "vcs.revision":
					rev = s.Value
				case "vcs.modified":
					dirty = s.Value == "true"
				}
			}
			if rev != "" && dirty {
				rev += "-dirty"
			}
			in.Commit = rev
		}
	}
	if in.Version == "" {
		in.Version = "dev"
	}
	if in.Commit == "" {
		in.Commit = "unknown"
	}
	in.FIPSMode = fipsMode(fips140.Enabled(), fips140.Enforced())
	in.FIPSModule = fips140.Version()
	return in
}

// fipsMode names the GODEBUG fips140 setting in effect, as the runtime
// reports it: "only" when non-approved algorithms are refused, "on" when
// the module runs in FIPS mode, else "off".
func fipsMode(enabled, enforced bool) string {
	switch {
	case enforced:
		return "only"
	case enabled:
		return "on"
	}
	return "off"
}

// WriteText writes i as `key: value` lines.
func (i Info) WriteText(w io.Writer) error {
	fips := "off"
	if i.FIPS {
		fips = "on"
	}
	_, err := fmt.Fprintf(w, "version: %s\ncommit: %s\ngo: %s\nfips140: %s (GODEBUG fips140=%s, module %s)\n", i.Version, i.Commit, i.GoVersion, fips, i.FIPSMode, i.FIPSModule)
	return err
}
