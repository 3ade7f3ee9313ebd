package file

import (
	"bytes"
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"k8s.io/apiserver/pkg/storage/value"
	kmsservice "k8s.io/kms/pkg/service"

	"github.com/kms-v2/kms-plugin/internal/fipstest"
	"github.com/kms-v2/kms-plugin/plugin/plugintest"
)

func TestKMSv2Contract(t *testing.T) {
	plugintest.Contract(t, open(t, newKeyset(t)))
}

// TestPromoteWhileServing runs eight "apiservers" against one plugin while
// another process (kmsctl's role) promotes new versions. Each apiserver
// re-seeds when Status shows a new key_id, as kube-apiserver does. Checked:
// Encrypt never stamps a key_id other than the one Status reported around
// it; the plugin follows each promote within 10 s; every object written
// under any key reads back through a restarted apiserver. Under
// GODEBUG=fips140=only the workers seal seeds with Encrypt instead of
// objects through kube-apiserver's envelope transformer (docs/fips.md).
func TestPromoteWhileServing(t *testing.T) {
	cfg := newKeyset(t)
	srv := plugintest.Serve(t, open(t, cfg), 200*time.Millisecond)
	admin := open(t, cfg)
	svc := plugintest.Client(t, srv)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()

	type sealed struct {
		seed []byte
		enc  *kmsservice.EncryptResponse
	}
	type written struct {
		key, plain string
		stored     []byte
	}
	var (
		mu      sync.Mutex
		objects []written
		seeds   []sealed
		keyIDs  = map[string]bool{}
		stop    = make(chan struct{})
		wg      sync.WaitGroup
		errs    = make(chan error, 16)
	)
	for w := 0; w < 8; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			var tr *plugintest.Transformer
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				before, err := svc.Status(ctx)
				if err != nil {
					errs <- fmt.Errorf("Status: %w", err)
					return
				}
				if fipstest.Only() {
					// The envelope transformer is excluded (docs/fips.md):
					// seal a seed directly, the plugin's own path.
					seed := []byte(fmt.Sprintf("%032d", w*1_000_000+i))
					enc, err := svc.Encrypt(ctx, fmt.Sprintf("uid-%d-%d", w, i), seed)
					if err != nil {
						errs <- fmt.Errorf("Encrypt: %w", err)
						return
					}
					if err := stampedBetween(ctx, svc, before.KeyID, enc.KeyID); err != nil {
						errs <- err
						return
					}
					mu.Lock()
					seeds = append(seeds, sealed{seed, enc})
					keyIDs[enc.KeyID] = true
					mu.Unlock()
					continue
				}
				if tr == nil || tr.KeyID != before.KeyID {
					next, err := plugintest.NewTransformer(ctx, svc, fmt.Sprintf("uid-%d-%d", w, i))
					if err != nil {
						errs <- fmt.Errorf("Encrypt: %w", err)
						return
					}
					if err := stampedBetween(ctx, svc, before.KeyID, next.KeyID); err != nil {
						errs <- err
						return
					}
					tr = next
				}
				key := fmt.Sprintf("/registry/secrets/ns/w%d-%d", w, i)
				plain := fmt.Sprintf("secret %d of worker %d", i, w)
				stored, err := tr.TransformToStorage(ctx, []byte(plain), value.DefaultContext(key))
				if err != nil {
					errs <- fmt.Errorf("write: %w", err)
					return
				}
				mu.Lock()
				objects = append(objects, written{key, plain, stored})
				keyIDs[tr.KeyID] = true
				mu.Unlock()
			}
		}(w)
	}
	for i := 0; i < 3; i++ {
		time.Sleep(300 * time.Millisecond)
		v, err := admin.CreateVersion(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if err := admin.Promote(ctx, v.KeyID); err != nil {
			t.Fatal(err)
		}
		deadline := time.Now().Add(10 * time.Second)
		for {
			st, err := svc.Status(ctx)
			if err != nil {
				t.Fatal(err)
			}
			if st.KeyID == v.KeyID {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("Status still reports %s 10 s after promoting %s", st.KeyID, v.KeyID)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	time.Sleep(300 * time.Millisecond)
	close(stop)
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if len(keyIDs) < 4 {
		t.Fatalf("objects were written under %d key_ids, want all 4", len(keyIDs))
	}
	for _, s := range seeds {
		got, err := svc.Decrypt(ctx, "uid-read", &kmsservice.DecryptRequest{KeyID: s.enc.KeyID, Ciphertext: s.enc.Ciphertext, Annotations: s.enc.Annotations})
		if err != nil || !bytes.Equal(got, s.seed) {
			t.Fatalf("decrypting a seed under %s: %v (match %v)", s.enc.KeyID, err, bytes.Equal(got, s.seed))
		}
	}
	reader := plugintest.FreshReader(svc, "")
	for _, o := range objects {
		got, _, err := reader.TransformFromStorage(ctx, o.stored, value.DefaultContext(o.key))
		if err != nil || string(got) != o.plain {
			t.Fatalf("reading %s back: %q, %v", o.key, got, err)
		}
	}
	t.Logf("%d objects and %d seeds under %d key_ids read back", len(objects), len(seeds), len(keyIDs))
}

// stampedBetween checks that an Encrypt stamped the key_id Status reported
// before it (before) or reports after it: a promote may land in between,
// never a third key.
func stampedBetween(ctx context.Context, svc kmsservice.Service, before, stamped string) error {
	after, err := svc.Status(ctx)
	if err != nil {
		return err
	}
	if stamped != before && stamped != after.KeyID {
		return fmt.Errorf("Encrypt stamped %s; Status said %s before and %s after", stamped, before, after.KeyID)
	}
	return nil
}
