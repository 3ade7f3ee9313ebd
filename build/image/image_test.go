package main

import (
	"archive/tar"
	"bytes"
	"debug/elf"
	"errors"
	"io"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
)

type entry struct {
	hdr  *tar.Header
	data []byte
}

// flatten reads the image's filesystem (layers applied in order).
func flatten(t *testing.T, img v1.Image) map[string]entry {
	t.Helper()
	rc := mutate.Extract(img)
	defer rc.Close()
	fs := map[string]entry{}
	tr := tar.NewReader(rc)
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			return fs
		}
		if err != nil {
			t.Fatal(err)
		}
		var data []byte
		if h.Typeflag == tar.TypeReg {
			if data, err = io.ReadAll(tr); err != nil {
				t.Fatal(err)
			}
		}
		fs[path.Clean("/"+h.Name)] = entry{h, data}
	}
}

// resolve follows symbolic links (of the path and its parents) inside the image.
func resolve(fs map[string]entry, p string) (string, bool) {
	for hops := 0; hops < 16; hops++ {
		parts := strings.Split(strings.TrimPrefix(path.Clean(p), "/"), "/")
		cur, changed := "/", false
		for i, part := range parts {
			next := path.Join(cur, part)
			e, ok := fs[next]
			if !ok {
				return next, false
			}
			if e.hdr.Typeflag == tar.TypeSymlink {
				target := e.hdr.Linkname
				if !path.IsAbs(target) {
					target = path.Join(cur, target)
				}
				p = path.Join(append([]string{target}, parts[i+1:]...)...)
				changed = true
				break
			}
			cur = next
		}
		if !changed {
			return cur, true
		}
	}
	return p, false
}

func TestImage(t *testing.T) {
	debDir := DefaultDebDir("amd64")
	if _, err := FetchDebs(debDir, "amd64"); err != nil {
		t.Fatalf("the image test needs the Debian packages %v: %v\n(run `make image-debs`, as root on Debian/Ubuntu, or install apt)", Packages, err)
	}
	bins := t.TempDir()
	const version, revision = "v0.0.0-imagetest", "0123456789abcdef0123456789abcdef01234567"
	if err := BuildBinaries("../..", bins, "amd64", version, revision); err != nil {
		t.Fatal(err)
	}
	created := time.Unix(1700000000, 0).UTC()
	opts := Options{Arch: "amd64", Version: version, Revision: revision, Created: created, DebDir: debDir, BinDir: bins}
	built, err := Build(opts)
	if err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(t.TempDir(), "image")
	if err := WriteLayout(out, built, opts); err != nil {
		t.Fatal(err)
	}
	for _, f := range []string{"oci-layout", "index.json"} {
		if _, err := os.Stat(filepath.Join(out, f)); err != nil {
			t.Fatal(err)
		}
	}

	// Read it back the way a consumer would.
	lp, err := layout.FromPath(out)
	if err != nil {
		t.Fatal(err)
	}
	idx, err := lp.ImageIndex()
	if err != nil {
		t.Fatal(err)
	}
	im, err := idx.IndexManifest()
	if err != nil {
		t.Fatal(err)
	}
	if len(im.Manifests) != 1 || im.Manifests[0].Platform == nil || im.Manifests[0].Platform.Architecture != "amd64" {
		t.Fatalf("index manifests: %+v", im.Manifests)
	}
	img, err := lp.Image(im.Manifests[0].Digest)
	if err != nil {
		t.Fatal(err)
	}
	wantDigest, _ := built.Digest()
	if im.Manifests[0].Digest != wantDigest {
		t.Errorf("layout holds %s, built %s", im.Manifests[0].Digest, wantDigest)
	}

	// The same inputs give the same image.
	again, err := Build(opts)
	if err != nil {
		t.Fatal(err)
	}
	if d, _ := again.Digest(); d != wantDigest {
		t.Errorf("not reproducible: %s then %s", wantDigest, d)
	}

	cf, err := img.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	if cf.Config.User != "65532:65532" {
		t.Errorf("user %q, want 65532:65532 (non-root)", cf.Config.User)
	}
	if strings.Join(cf.Config.Entrypoint, " ") != "/usr/local/bin/kms-plugin" {
		t.Errorf("entrypoint %q", cf.Config.Entrypoint)
	}
	if strings.Join(cf.Config.Cmd, " ") != "serve --config /etc/kms-plugin/config.yaml" {
		t.Errorf("cmd %q", cf.Config.Cmd)
	}
	if cf.OS != "linux" || cf.Architecture != "amd64" {
		t.Errorf("platform %s/%s", cf.OS, cf.Architecture)
	}
	for k, want := range map[string]string{
		"org.opencontainers.image.title":    "kms-plugin",
		"org.opencontainers.image.version":  version,
		"org.opencontainers.image.revision": opts.Revision,
		"org.opencontainers.image.created":  "2023-11-14T22:13:20Z",
	} {
		if got := cf.Config.Labels[k]; got != want {
			t.Errorf("label %s = %q, want %q", k, got, want)
		}
	}
	if !cf.Created.Time.Equal(created) {
		t.Errorf("created %v, want %v", cf.Created, created)
	}

	fs := flatten(t, img)
	var size int64
	for _, e := range fs {
		size += e.hdr.Size
	}
	t.Logf("image %s: %d files, %.1f MiB uncompressed", wantDigest, len(fs), float64(size)/(1<<20))

	for _, b := range Binaries {
		p := "/usr/local/bin/" + b
		e, ok := fs[p]
		if !ok {
			t.Fatalf("%s missing", p)
		}
		if e.hdr.Typeflag != tar.TypeReg || e.hdr.Mode&0o111 != 0o111 {
			t.Errorf("%s: type %q mode %o, want an executable file", p, e.hdr.Typeflag, e.hdr.Mode)
		}
		ef, err := elf.NewFile(bytes.NewReader(e.data))
		if err != nil {
			t.Fatalf("%s: %v", p, err)
		}
		if ef.Machine != elf.EM_X86_64 {
			t.Errorf("%s: machine %v", p, ef.Machine)
		}
		interp := ""
		for _, prog := range ef.Progs {
			if prog.Type == elf.PT_INTERP {
				b, err := io.ReadAll(prog.Open())
				if err != nil {
					t.Fatal(err)
				}
				interp = strings.TrimRight(string(b), "\x00")
			}
		}
		if interp == "" {
			t.Errorf("%s: no PT_INTERP; a cgo build is dynamically linked", p)
		} else if real, ok := resolve(fs, interp); !ok || fs[real].hdr.Typeflag != tar.TypeReg {
			t.Errorf("%s: its loader %s is not in the image (resolved to %s)", p, interp, real)
		}
		libs, err := ef.ImportedLibraries()
		if err != nil {
			t.Fatal(err)
		}
		for _, lib := range libs {
			found := false
			for _, dir := range []string{"/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu"} {
				if _, ok := resolve(fs, dir+"/"+lib); ok {
					found = true
				}
			}
			if !found {
				t.Errorf("%s needs %s, not in the image", p, lib)
			}
		}
	}

	for _, sh := range []string{"/bin/sh", "/bin/bash", "/bin/dash", "/usr/bin/sh", "/usr/bin/bash", "/usr/bin/dash", "/bin/busybox", "/usr/bin/busybox"} {
		if _, ok := fs[sh]; ok {
			t.Errorf("%s is in the image; it must have no shell", sh)
		}
	}
	for _, lib := range []string{"/lib64/ld-linux-x86-64.so.2", "/lib/x86_64-linux-gnu/libc.so.6", "/usr/lib/x86_64-linux-gnu/libstdc++.so.6", "/lib/x86_64-linux-gnu/libgcc_s.so.1"} {
		if _, ok := resolve(fs, lib); !ok {
			t.Errorf("%s missing", lib)
		}
	}
	if e := fs["/etc/passwd"]; !strings.Contains(string(e.data), "nonroot:x:65532:65532:") {
		t.Errorf("/etc/passwd has no nonroot 65532: %q", e.data)
	}
	if e := fs["/etc/group"]; !strings.Contains(string(e.data), "nonroot:x:65532:") {
		t.Errorf("/etc/group has no nonroot 65532: %q", e.data)
	}
	if e, ok := fs["/tmp"]; !ok || e.hdr.Typeflag != tar.TypeDir || e.hdr.Mode&0o7777 != 0o1777 {
		t.Errorf("/tmp missing or not 1777")
	}
	bundle := fs["/etc/ssl/certs/ca-certificates.crt"].data
	if n := strings.Count(string(bundle), "-----BEGIN CERTIFICATE-----"); n < 100 {
		t.Errorf("CA bundle has %d certificates", n)
	}
	for p := range fs {
		for _, d := range []string{"/usr/share/doc/", "/usr/share/man/", "/usr/share/locale/"} {
			if strings.HasPrefix(p+"/", d) {
				t.Errorf("%s: documentation is left out of the image", p)
			}
		}
	}

	// Run the plugin inside the image's filesystem (chroot, as the nonroot
	// user): its loader and libraries come from the image alone.
	if os.Geteuid() != 0 {
		t.Log("not root: the chroot run of kms-plugin in the image is not done")
		return
	}
	root := t.TempDir()
	for p, e := range fs {
		dst := filepath.Join(root, p)
		if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
			t.Fatal(err)
		}
		switch e.hdr.Typeflag {
		case tar.TypeDir:
			err = os.MkdirAll(dst, 0o755)
			if err == nil {
				err = os.Chmod(dst, os.FileMode(e.hdr.Mode&0o777)|os.ModeSticky*os.FileMode(e.hdr.Mode>>9&1))
			}
		case tar.TypeReg:
			err = os.WriteFile(dst, e.data, os.FileMode(e.hdr.Mode&0o777))
		case tar.TypeSymlink:
			err = os.Symlink(e.hdr.Linkname, dst)
		case tar.TypeLink:
			err = os.WriteFile(dst, fs[path.Clean("/"+e.hdr.Linkname)].data, os.FileMode(e.hdr.Mode&0o777))
		}
		if err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Chmod(root, 0o755); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("/usr/local/bin/kms-plugin", "version")
	cmd.Env = cf.Config.Env
	cmd.Dir = "/"
	cmd.SysProcAttr = &syscall.SysProcAttr{Chroot: root, Credential: &syscall.Credential{Uid: 65532, Gid: 65532}}
	got, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("kms-plugin version in the image: %v: %s", err, got)
	}
	// The stamped version and commit come first; Go version and FIPS mode
	// follow.
	if want := "version: " + version + "\ncommit: " + revision + "\n"; !strings.HasPrefix(string(got), want) {
		t.Errorf("kms-plugin version in the image printed %q, want it to start with %q", got, want)
	}
}
