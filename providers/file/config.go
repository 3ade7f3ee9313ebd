package file

import (
	"errors"
	"path/filepath"
)

// Config is the `provider.file` section of the plugin configuration.
type Config struct {
	// Path is the keyset file. Relative paths resolve against the config
	// file's folder. `kmsctl keys init` creates it; kms-plugin never does.
	Path string `json:"path"`
}

// ResolvePaths makes Path absolute against dir, the config file's folder.
func (c *Config) ResolvePaths(dir string) {
	if c.Path != "" && !filepath.IsAbs(c.Path) {
		c.Path = filepath.Join(dir, c.Path)
	}
}

// Validate checks the section.
func (c Config) Validate() error {
	if c.Path == "" {
		return errors.New("path: missing; set the keyset file, e.g. /etc/kms-plugin/keyset.json")
	}
	return nil
}
