package buildinfo

import (
	"runtime/debug"
	"testing"
)

func TestGet(t *testing.T) {
	built := func(version string, settings ...string) func() (*debug.BuildInfo, bool) {
		return func() (*debug.BuildInfo, bool) {
			bi := &debug.BuildInfo{Main: debug.Module{Version: version}}
			for i := 0; i+1 < len(settings); i += 2 {
				bi.Settings = append(bi.Settings, debug.BuildSetting{Key: settings[i], Value: settings[i+1]})
			}
			return bi, true
		}
	}
	none := func() (*debug.BuildInfo, bool) { return nil, false }
	tests := []struct {
		name                 string
		version, commit      string
		read                 func() (*debug.BuildInfo, bool)
		wantVersion, wantRev string
	}{
		{"ldflags win", "v1.2.3", "abc", built("v9.9.9", "vcs.revision", "def"), "v1.2.3", "abc"},
		{"vcs fallback", "", "", built("(devel)", "vcs.revision", "def", "vcs.modified", "false"), "dev", "def"},
		{"dirty tree", "", "", built("(devel)", "vcs.revision", "def", "vcs.modified", "true"), "dev", "def-dirty"},
		{"go install version", "dev", "", built("v0.4.0"), "v0.4.0", "unknown"},
		{"no build info", "", "", none, "dev", "unknown"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := get(tt.version, tt.commit, tt.read)
			if got.Version != tt.wantVersion || got.Commit != tt.wantRev {
				t.Errorf("got version %q commit %q, want %q %q", got.Version, got.Commit, tt.wantVersion, tt.wantRev)
			}
			if got.GoVersion == "" || got.FIPSModule == "" {
				t.Errorf("got %+v, want GoVersion and FIPSModule set", got)
			}
		})
	}
}

func TestFIPSMode(t *testing.T) {
	tests := []struct {
		name              string
		enabled, enforced bool
		want              string
	}{
		{"off", false, false, "off"},
		{"on", true, false, "on"},
		{"only", true, true, "only"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := fipsMode(tt.enabled, tt.enforced); got != tt.want {
				t.Errorf("got %q, want %q", got, tt.want)
			}
		})
	}
}
