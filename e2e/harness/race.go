//go:build race

package harness

// raceEnabled is true when this binary runs under the race detector.
const raceEnabled = true
