// Package cli holds the command-line conventions kms-plugin and kmsctl
// share: a command tree that refuses what it does not know, and the
// `version` command.
package cli

import (
	"fmt"
	"strings"

	"github.com/spf13/cobra"

	"github.com/kms-v2/kms-plugin/cmd/internal/buildinfo"
	"github.com/kms-v2/kms-plugin/cmd/internal/output"
)

// Strict makes every command of the tree that only groups subcommands
// (root, `kmsctl keys`) refuse an unknown subcommand with one line naming
// it and --help, and a non-zero exit. Cobra alone prints the group's help
// and exits 0 for `kmsctl keys nope`, so a typo in a script passes. Without
// arguments such a command still prints its help.
func Strict(root *cobra.Command) {
	if !root.HasParent() {
		// Cobra adds `completion` (a group too) only when it executes;
		// add it now so it is strict as well.
		root.InitDefaultCompletionCmd()
	}
	for _, c := range root.Commands() {
		Strict(c)
	}
	if !root.HasSubCommands() || root.Run != nil || root.RunE != nil {
		return
	}
	root.Args = cobra.ArbitraryArgs
	root.RunE = func(cmd *cobra.Command, args []string) error {
		if len(args) == 0 {
			return cmd.Help()
		}
		return UnknownCommand(cmd, args[0])
	}
}

// UnknownCommand is the error for an unknown subcommand name of cmd.
func UnknownCommand(cmd *cobra.Command, name string) error {
	hint := ""
	if cmd.SuggestionsMinimumDistance <= 0 {
		cmd.SuggestionsMinimumDistance = 2 // cobra's default, set only on its own path
	}
	if s := cmd.SuggestionsFor(name); len(s) > 0 {
		hint = " (did you mean " + strings.Join(s, " or ") + "?)"
	}
	return fmt.Errorf("unknown command %q for %q%s; see %s --help", name, cmd.CommandPath(), hint, cmd.CommandPath())
}

// VersionCommand is `version [-o json]`: the binary's version, commit, Go
// version and FIPS 140-3 mode. version and commit are the binary's
// -ldflags -X values (empty when unset).
func VersionCommand(version, commit string) *cobra.Command {
	var format output.Format
	cmd := &cobra.Command{
		Use:   "version",
		Short: "Print the version, commit, Go version and FIPS 140-3 mode",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			info := buildinfo.Get(version, commit)
			if format.IsJSON() {
				return output.WriteJSON(cmd.OutOrStdout(), info)
			}
			return info.WriteText(cmd.OutOrStdout())
		},
	}
	output.Register(cmd.Flags(), &format)
	return cmd
}
