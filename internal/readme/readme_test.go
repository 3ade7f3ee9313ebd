package readme

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestBlock(t *testing.T) {
	path := filepath.Join(t.TempDir(), "README.md")
	text := "# x\n\n<!-- other: -->\n```sh\nwrong\n```\n\n<!-- step: run by a test -->\n```sh\necho one\necho two\n```\n\n<!-- open: -->\n```sh\nnever closed\n"
	if err := os.WriteFile(path, []byte(text), 0o600); err != nil {
		t.Fatal(err)
	}
	got, err := Block(path, "step")
	if err != nil || got != "echo one\necho two\n" {
		t.Errorf("Block(step) = %q, %v; want the two echo lines", got, err)
	}
	for name, want := range map[string]string{"missing": "no <!-- missing: --> marker", "open": "not closed"} {
		if _, err := Block(path, name); err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("Block(%s): %v, want an error containing %q", name, err, want)
		}
	}
}
