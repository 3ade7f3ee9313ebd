// Package leakcanary finds secrets in what a test run wrote: logs, command
// output, metrics. Tests register every secret they use (seeds, keys, PINs,
// client secrets, plaintexts) and scan the run's output for them, raw and
// in each encoding a careless log line would use: hex (either case) and
// base64 in the standard and URL alphabets, with and without padding, at
// any alignment inside a longer encoded value.
package leakcanary

import (
	"bytes"
	"encoding/base64"
	"encoding/hex"
	"fmt"
	"sort"
	"sync"
)

// MinSize is the shortest secret worth searching for: shorter values
// match by chance.
const MinSize = 8

// Canary holds registered secrets. The zero value is ready to use, and it is
// safe for concurrent use.
type Canary struct {
	mu       sync.Mutex
	patterns map[string]pattern // needle -> what it is
	secrets  map[string]bool    // raw secret, for Len
	short    int
}

// pattern is one searchable form of a secret.
type pattern struct {
	label, encoding string
}

// Hit is one registered secret found in a corpus.
type Hit struct {
	// Label says what the secret is, as registered (never the secret).
	Label string
	// Encoding is how it appeared: raw, hex, HEX, base64, base64url,
	// base64-nopad, base64url-nopad (the -nopad forms also match the
	// secret inside a longer encoded value).
	Encoding string
	// Offset is where in the corpus.
	Offset int
}

func (h Hit) String() string {
	return fmt.Sprintf("%s (%s) at byte %d", h.Label, h.Encoding, h.Offset)
}

// Register adds a secret under a label that names it without revealing it.
// Secrets shorter than MinSize are not searched for (they would match by
// chance); Short counts them.
func (c *Canary) Register(label string, secret []byte) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if len(secret) < MinSize {
		c.short++
		return
	}
	if c.patterns == nil {
		c.patterns = map[string]pattern{}
		c.secrets = map[string]bool{}
	}
	if c.secrets[string(secret)] {
		return
	}
	c.secrets[string(secret)] = true
	add := func(needle, encoding string) {
		if len(needle) >= MinSize {
			if _, ok := c.patterns[needle]; !ok {
				c.patterns[needle] = pattern{label, encoding}
			}
		}
	}
	add(string(secret), "raw")
	h := hex.EncodeToString(secret)
	add(h, "hex")
	add(string(bytes.ToUpper([]byte(h))), "HEX")
	add(base64.StdEncoding.EncodeToString(secret), "base64")
	add(base64.URLEncoding.EncodeToString(secret), "base64url")
	// Without padding, and inside a longer value: the secret starting at
	// byte offset 0, 1 or 2 of a 3-byte group. Keep only the characters
	// that depend on the secret's bytes alone.
	for k := 0; k < 3; k++ {
		buf := append(make([]byte, k), secret...)
		first := (8*k + 5) / 6              // first character wholly inside the secret
		last := (8 * (k + len(secret))) / 6 // characters wholly inside end here
		for _, enc := range []struct {
			e    *base64.Encoding
			name string
		}{{base64.RawStdEncoding, "base64-nopad"}, {base64.RawURLEncoding, "base64url-nopad"}} {
			s := enc.e.EncodeToString(buf)
			if last <= len(s) && first < last {
				add(s[first:last], enc.name)
			}
		}
	}
}

// RegisterString is Register for a string secret.
func (c *Canary) RegisterString(label, secret string) { c.Register(label, []byte(secret)) }

// Len is how many secrets are searched for.
func (c *Canary) Len() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.secrets)
}

// Short is how many registered secrets were too short to search for.
func (c *Canary) Short() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.short
}

// Scan returns every registered secret found in corpus, in corpus order.
func (c *Canary) Scan(corpus []byte) []Hit {
	c.mu.Lock()
	defer c.mu.Unlock()
	var hits []Hit
	for needle, p := range c.patterns {
		for off := 0; ; {
			i := bytes.Index(corpus[off:], []byte(needle))
			if i < 0 {
				break
			}
			hits = append(hits, Hit{Label: p.label, Encoding: p.encoding, Offset: off + i})
			off += i + 1
		}
	}
	sort.Slice(hits, func(i, j int) bool {
		if hits[i].Offset != hits[j].Offset {
			return hits[i].Offset < hits[j].Offset
		}
		return hits[i].Label+hits[i].Encoding < hits[j].Label+hits[j].Encoding
	})
	return hits
}

// Default is the process-wide canary the package functions use.
var Default = &Canary{}

// Register adds a secret to Default.
func Register(label string, secret []byte) { Default.Register(label, secret) }

// RegisterString adds a string secret to Default.
func RegisterString(label, secret string) { Default.RegisterString(label, secret) }

// Scan searches corpus for Default's secrets.
func Scan(corpus []byte) []Hit { return Default.Scan(corpus) }
