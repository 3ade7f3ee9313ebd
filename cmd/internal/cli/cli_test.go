package cli

import (
	"io"
	"strings"
	"testing"

	"github.com/spf13/cobra"
)

func TestStrict(t *testing.T) {
	tree := func() *cobra.Command {
		root := &cobra.Command{Use: "tool", SilenceErrors: true, SilenceUsage: true}
		group := &cobra.Command{Use: "keys"}
		group.AddCommand(&cobra.Command{Use: "list", RunE: func(*cobra.Command, []string) error { return nil }})
		root.AddCommand(group)
		root.SetOut(io.Discard)
		root.SetErr(io.Discard)
		Strict(root)
		return root
	}
	tests := []struct {
		name    string
		args    []string
		wantErr string
	}{
		{"known", []string{"keys", "list"}, ""},
		{"group alone prints help", []string{"keys"}, ""},
		{"root alone prints help", nil, ""},
		{"unknown under root", []string{"nope"}, `unknown command "nope" for "tool"; see tool --help`},
		{"unknown under group", []string{"keys", "nope"}, `unknown command "nope" for "tool keys"; see tool keys --help`},
		{"typo", []string{"keys", "lsit"}, "did you mean list?"},
		{"unknown under completion", []string{"completion", "nope"}, `unknown command "nope" for "tool completion"`},
		{"completion still works", []string{"completion", "bash"}, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			root := tree()
			root.SetArgs(tt.args)
			err := root.Execute()
			switch {
			case tt.wantErr == "" && err != nil:
				t.Fatalf("got %v, want success", err)
			case tt.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tt.wantErr)):
				t.Fatalf("got %v, want %q", err, tt.wantErr)
			}
		})
	}
}
