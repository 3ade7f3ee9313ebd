package main

import (
	"log"
	"os"
	"path/filepath"
	"sort"
	"strings"
)

// median of xs (the lower middle one for an even count): a round to show
// the details of, the one that is not the slower of the middle two.
func median[T any](xs []T, less func(a, b T) bool) T {
	s := append([]T(nil), xs...)
	sort.Slice(s, func(i, j int) bool { return less(s[i], s[j]) })
	return s[(len(s)-1)/2]
}

// medianOf is the median of the values of xs (the mean of the middle two for
// an even count, so two rounds give their mean rather than the better one).
func medianOf[T any](xs []T, val func(T) float64) float64 {
	v := make([]float64, len(xs))
	for i, x := range xs {
		v[i] = val(x)
	}
	sort.Float64s(v)
	n := len(v)
	if n%2 == 1 {
		return v[n/2]
	}
	return (v[n/2-1] + v[n/2]) / 2
}

func slicesMax[T any](xs []T, less func(a, b T) bool) T {
	m := xs[0]
	for _, x := range xs[1:] {
		if less(m, x) {
			m = x
		}
	}
	return m
}

func verdict(ok bool) string {
	if ok {
		return "met"
	}
	return "NOT met"
}

// putSection replaces the section that starts with heading (up to the next
// "## " heading) in path, or appends it; other sections stay as they are.
func putSection(path, heading, body string) error {
	old, err := os.ReadFile(path)
	if err != nil && !os.IsNotExist(err) {
		return err
	}
	text := string(old)
	if text == "" {
		text = "# Benchmarks\n\n"
	}
	if i := strings.Index(text, heading+"\n"); i >= 0 {
		rest := text[i+len(heading)+1:]
		end := len(text)
		if j := strings.Index(rest, "\n## "); j >= 0 {
			end = i + len(heading) + 1 + j + 1
		}
		text = text[:i] + body + "\n" + text[end:]
	} else {
		if !strings.HasSuffix(text, "\n\n") {
			text = strings.TrimRight(text, "\n") + "\n\n"
		}
		text += body
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return err
	}
	log.Printf("wrote the Rotation section to %s", path)
	return os.WriteFile(path, []byte(strings.TrimRight(text, "\n")+"\n"), 0o644)
}
