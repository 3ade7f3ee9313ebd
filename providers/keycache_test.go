package providers

import (
	"context"
	"errors"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// fakeBackend serves a key state (a list of version names) to a KeyCache
// and lets a test hold individual loads in flight.
type fakeBackend struct {
	mu       sync.Mutex
	versions []string
	fail     error
	gates    map[int64]chan struct{} // load number -> released when closed
	loads    atomic.Int64
	started  chan int64
}

func newFakeBackend(versions ...string) *fakeBackend {
	return &fakeBackend{versions: versions, gates: map[int64]chan struct{}{}, started: make(chan int64, 100)}
}

// hold makes load number n wait until the returned func is called.
func (b *fakeBackend) hold(n int64) (release func()) {
	ch := make(chan struct{})
	b.mu.Lock()
	b.gates[n] = ch
	b.mu.Unlock()
	return func() { close(ch) }
}

// waitStarted returns once load number n has read the versions.
func (b *fakeBackend) waitStarted(n int64) {
	for got := <-b.started; got != n; got = <-b.started {
	}
}

func (b *fakeBackend) set(versions ...string) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.versions = versions
}

// load reads the versions when it starts, as a list call does, and returns
// them when its gate opens.
func (b *fakeBackend) load(context.Context) ([]string, error) {
	n := b.loads.Add(1)
	b.mu.Lock()
	snap, fail, gate := slices.Clone(b.versions), b.fail, b.gates[n]
	b.mu.Unlock()
	b.started <- n
	if gate != nil {
		<-gate
	}
	if fail != nil {
		return nil, fail
	}
	return snap, nil
}

func (b *fakeBackend) failWith(err error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.fail = err
}

// loadedCache returns a cache over a backend holding versions, after its
// first load.
func loadedCache(t *testing.T, versions ...string) (*fakeBackend, *KeyCache[[]string]) {
	t.Helper()
	b := newFakeBackend(versions...)
	c := NewKeyCache(b.load, nil)
	if err := c.Reload(context.Background()); err != nil {
		t.Fatal(err)
	}
	return b, c
}

func has(name string) func([]string) (string, bool) {
	return func(s []string) (string, bool) { return name, slices.Contains(s, name) }
}

func TestKeyCacheCurrentBeforeLoad(t *testing.T) {
	c := NewKeyCache(newFakeBackend("a").load, nil)
	if _, err := c.Current(); !errors.Is(err, ErrUnavailable) {
		t.Fatalf("Current before any load: got %v, want ErrUnavailable", err)
	}
}

func TestKeyCacheFailedLoadKeepsSnapshot(t *testing.T) {
	b, c := loadedCache(t, "a")
	b.failWith(ErrUnavailable)
	if err := c.Refresh(context.Background()); !errors.Is(err, ErrUnavailable) {
		t.Fatalf("Refresh with a failing backend: got %v, want its error", err)
	}
	if got, err := c.Current(); err != nil || !slices.Equal(got, []string{"a"}) {
		t.Fatalf("Current after a failed load = %v, %v; want the previous [a]", got, err)
	}
}

// A burst of refreshes costs the backend one load.
func TestKeyCacheRefreshIsShared(t *testing.T) {
	b := newFakeBackend("a")
	release := b.hold(1)
	c := NewKeyCache(b.load, nil)
	var wg sync.WaitGroup
	for i := 0; i < 16; i++ {
		wg.Add(1)
		go func() { defer wg.Done(); _ = c.Refresh(context.Background()) }()
	}
	b.waitStarted(1)
	time.Sleep(50 * time.Millisecond) // let the others join
	release()
	wg.Wait()
	if got := b.loads.Load(); got != 1 {
		t.Fatalf("16 concurrent Refreshes made %d loads, want 1", got)
	}
}

// A slow load that started first must not replace the snapshot of a load
// that started after it, or a background refresh could undo a promote.
func TestKeyCacheOlderLoadDoesNotOverwriteNewer(t *testing.T) {
	b := newFakeBackend("a")
	var published [][]string
	c := NewKeyCache(b.load, func(_, next []string) { published = append(published, next) })
	release := b.hold(1)
	done := make(chan error)
	go func() { done <- c.Reload(context.Background()) }()
	b.waitStarted(1) // load 1 has read [a] and is held
	b.set("a", "b")
	if err := c.Reload(context.Background()); err != nil { // load 2
		t.Fatal(err)
	}
	release()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if got, _ := c.Current(); !slices.Equal(got, []string{"a", "b"}) {
		t.Fatalf("Current = %v after the older load finished last, want the newer [a b]", got)
	}
	if len(published) != 1 {
		t.Fatalf("published %v, want only the newer snapshot", published)
	}
}

func TestKeyCachePublishedSeesPrevious(t *testing.T) {
	b := newFakeBackend("a")
	type call struct{ prev, next []string }
	var calls []call
	c := NewKeyCache(b.load, func(prev, next []string) { calls = append(calls, call{prev, next}) })
	_ = c.Reload(context.Background())
	b.set("a", "b")
	_ = c.Reload(context.Background())
	if len(calls) != 2 || calls[0].prev != nil || !slices.Equal(calls[1].prev, []string{"a"}) || !slices.Equal(calls[1].next, []string{"a", "b"}) {
		t.Fatalf("published calls %v, want (nil, [a]) then ([a], [a b])", calls)
	}
}

func TestLookupVersion(t *testing.T) {
	b, c := loadedCache(t, "a")
	tests := []struct {
		name      string
		version   string
		setup     func()
		wantFound bool
		wantLoads int64 // beyond the first
	}{
		{"Known", "a", func() {}, true, 0},
		{"NewVersionFoundAfterOneLoad", "b", func() { b.set("a", "b") }, true, 1},
		{"UnknownCostsOneLoad", "zzz", func() {}, false, 1},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			tt.setup()
			before := b.loads.Load()
			_, found, err := LookupVersion(context.Background(), c, has(tt.version))
			if err != nil || found != tt.wantFound {
				t.Fatalf("LookupVersion(%s) = found %v, %v; want found %v", tt.version, found, err, tt.wantFound)
			}
			if got := b.loads.Load() - before; got != tt.wantLoads {
				t.Fatalf("LookupVersion(%s) made %d loads, want %d", tt.version, got, tt.wantLoads)
			}
		})
	}
}

// The refresh a miss joins may have listed before the version existed; the
// lookup must then load once more itself instead of calling a key that
// exists unknown.
func TestLookupVersionLoadsOnceMoreAfterAnOlderRefresh(t *testing.T) {
	b, c := loadedCache(t, "a") // load 1
	release := b.hold(2)
	go func() { _ = c.Refresh(context.Background()) }()
	b.waitStarted(2) // load 2 (the background refresh) has listed [a]
	b.set("a", "b")
	missed := make(chan struct{}, 1)
	find := func(s []string) (string, bool) {
		select {
		case missed <- struct{}{}:
		default:
		}
		return has("b")(s)
	}
	type result struct {
		found bool
		err   error
	}
	res := make(chan result)
	go func() {
		_, found, err := LookupVersion(context.Background(), c, find)
		res <- result{found, err}
	}()
	<-missed
	time.Sleep(50 * time.Millisecond) // let the lookup join load 2
	release()
	if r := <-res; r.err != nil || !r.found {
		t.Fatalf("LookupVersion(b) = found %v, %v; want found after loading once more", r.found, r.err)
	}
	if got := b.loads.Load(); got != 3 {
		t.Fatalf("%d loads, want 3 (first, the joined refresh, one more)", got)
	}
}

func TestLookupVersionRefreshFails(t *testing.T) {
	b, c := loadedCache(t, "a")
	b.failWith(ErrUnavailable)
	if _, found, err := LookupVersion(context.Background(), c, has("b")); found || !errors.Is(err, ErrUnavailable) {
		t.Fatalf("LookupVersion with a failing backend = found %v, %v; want the load's error", found, err)
	}
	if v, found, err := LookupVersion(context.Background(), c, has("a")); !found || err != nil || v != "a" {
		t.Fatalf("LookupVersion of a cached version with a failing backend = %q, %v, %v; want it served from cache", v, found, err)
	}
}
