package providers

import "time"

// StateOf is the state `kmsctl keys list` shows for a version. Every
// backend keeps its primary enabled, so primary wins: the one version
// Encrypt uses is shown as such rather than as one more enabled version.
func StateOf(primary, enabled bool) KeyState {
	switch {
	case primary:
		return StatePrimary
	case enabled:
		return StateEnabled
	}
	return StateDisabled
}

// ListVersions turns a backend's versions into what Rotator.Versions
// returns. ordered must already be oldest first: each backend knows its own
// tie-break (a version number, a version ID). primary is compared with ==,
// and describe reports a version's key_id, whether it is enabled, and when
// it was made.
func ListVersions[V comparable](ordered []V, primary V, describe func(V) (keyID string, enabled bool, created time.Time)) []KeyVersion {
	out := make([]KeyVersion, 0, len(ordered))
	for _, v := range ordered {
		id, enabled, created := describe(v)
		out = append(out, KeyVersion{KeyID: id, State: StateOf(v == primary, enabled), Created: created})
	}
	return out
}
