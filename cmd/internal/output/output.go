// Package output is the one `-o/--output` flag of every command: the same
// values everywhere, validated while flags are parsed, one message listing
// them.
package output

import (
	"encoding/json"
	"fmt"
	"io"

	"github.com/spf13/pflag"
)

// Format is an output format. Its zero value is Table.
type Format string

const (
	// Table is the human form: aligned columns or `key: value` lines.
	Table Format = "table"
	// JSON is indented JSON, one document per run, for scripts.
	JSON Format = "json"
)

// aliases are older spellings still accepted: `kmsctl rotate -o text`
// predates the shared flag.
var aliases = map[string]Format{"text": Table}

// Allowed is the message every invalid value gets.
const Allowed = "want table or json"

// String implements pflag.Value.
func (f *Format) String() string {
	if *f == "" {
		return string(Table)
	}
	return string(*f)
}

// Set implements pflag.Value: anything but table or json (or an alias) is
// refused before the command runs.
func (f *Format) Set(s string) error {
	switch v := Format(s); v {
	case Table, JSON:
		*f = v
		return nil
	}
	if v, ok := aliases[s]; ok {
		*f = v
		return nil
	}
	return fmt.Errorf("%s", Allowed)
}

// Type implements pflag.Value; it is the placeholder --help prints.
func (f *Format) Type() string { return "table|json" }

// Register adds -o/--output to fs, defaulting to table.
func Register(fs *pflag.FlagSet, f *Format) {
	*f = Table
	fs.VarP(f, "output", "o", "output format: table or json")
}

// IsJSON reports whether the format is JSON.
func (f Format) IsJSON() bool { return f == JSON }

// WriteJSON writes v as indented JSON: the `-o json` form of every command.
func WriteJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}
