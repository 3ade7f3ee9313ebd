// Package readme finds the shell blocks of README.md that tests run as
// users copy them. A block is marked by an HTML comment, invisible on the
// rendered page, just before its fence:
//
//	<!-- NAME: run by some_test.go -->
//	```sh
//	...
//	```
//
// so a test runs exactly the text a user pastes, and a README edit that
// breaks a command fails that test.
package readme

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
)

// Block returns the body of the ```sh block after the <!-- name: marker in
// the README at path.
func Block(path, name string) (string, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return "", err
	}
	file := filepath.Base(path)
	_, rest, ok := strings.Cut(string(b), "<!-- "+name+":")
	if !ok {
		return "", fmt.Errorf("%s has no <!-- %s: --> marker", file, name)
	}
	_, rest, ok = strings.Cut(rest, "```sh\n")
	if !ok {
		return "", fmt.Errorf("%s: no ```sh block after the %s marker", file, name)
	}
	block, _, ok := strings.Cut(rest, "```")
	if !ok {
		return "", fmt.Errorf("%s: the %s block is not closed", file, name)
	}
	return block, nil
}
