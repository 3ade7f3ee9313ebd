package output

import (
	"strings"
	"testing"

	"github.com/spf13/pflag"
)

func TestFormatFlag(t *testing.T) {
	tests := []struct {
		name    string
		args    []string
		want    Format
		wantErr string
	}{
		{"default", nil, Table, ""},
		{"table", []string{"-o", "table"}, Table, ""},
		{"json", []string{"--output=json"}, JSON, ""},
		{"text alias", []string{"-o", "text"}, Table, ""},
		{"yaml", []string{"-o", "yaml"}, "", `invalid argument "yaml" for "-o, --output" flag: want table or json`},
		{"case matters", []string{"-o", "JSON"}, "", "want table or json"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			fs := pflag.NewFlagSet("t", pflag.ContinueOnError)
			var f Format
			Register(fs, &f)
			err := fs.Parse(tt.args)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("got error %v, want %q", err, tt.wantErr)
				}
				return
			}
			if err != nil || f != tt.want {
				t.Fatalf("got %q, %v; want %q", f, err, tt.want)
			}
		})
	}
}
