package main

import (
	"encoding/json"
	"os"
	"regexp"
	"slices"
	"strings"
	"testing"
)

// TestDockerfileInStep: the Dockerfile, for builders who can reach a
// registry, makes the image `make image` makes: the same build flags, user,
// entrypoint and command, on a distroless cc base pinned by digest.
func TestDockerfileInStep(t *testing.T) {
	b, err := os.ReadFile("../../Dockerfile")
	if err != nil {
		t.Fatal(err)
	}
	var froms, builds []string
	directive := map[string]string{}
	for _, line := range strings.Split(string(b), "\n") {
		word, rest, _ := strings.Cut(strings.TrimSpace(line), " ")
		switch word {
		case "FROM":
			froms = append(froms, rest)
		case "RUN":
			if strings.Contains(rest, "go build") {
				builds = append(builds, rest)
			}
		case "USER", "ENTRYPOINT", "CMD":
			directive[word] = rest
		}
	}
	if len(froms) == 0 || !regexp.MustCompile(`^gcr\.io/distroless/cc-debian\d+:nonroot@sha256:[0-9a-f]{64}$`).MatchString(froms[len(froms)-1]) {
		t.Errorf("the runtime base %q: want gcr.io/distroless/cc-debian*:nonroot pinned by digest", froms)
	}
	if len(builds) != 1 {
		t.Fatalf("want one go build line, got %q", builds)
	}
	for _, flag := range []string{"CGO_ENABLED=1", "-trimpath", "-s -w", "-X main.version=", "-X main.commit="} {
		if !strings.Contains(builds[0], flag) {
			t.Errorf("the Dockerfile's go build lacks %s, which BuildBinaries uses: %s", flag, builds[0])
		}
	}
	if directive["USER"] != User {
		t.Errorf("USER %q, the image's user is %q", directive["USER"], User)
	}
	for name, want := range map[string][]string{"ENTRYPOINT": Entrypoint, "CMD": Cmd} {
		var got []string
		if err := json.Unmarshal([]byte(directive[name]), &got); err != nil || !slices.Equal(got, want) {
			t.Errorf("%s %s (%v), the image's is %q", name, directive[name], err, want)
		}
	}
}
