// Command image builds the release image of kms-plugin and kmsctl as an OCI
// image layout (a directory: oci-layout, index.json, blobs/sha256/...)
// without a container engine. See docs/image.md.
//
// The image has two layers:
//   - a base layer made from Debian packages (libc6, libgcc-s1, libstdc++6,
//     ca-certificates) plus the few files a package's maintainer scripts or
//     base-files would otherwise provide: /etc/passwd, /etc/group and
//     /etc/nsswitch.conf with the nonroot user 65532, /home/nonroot, /tmp
//     (1777) and the CA bundle /etc/ssl/certs/ca-certificates.crt;
//   - an application layer with /usr/local/bin/kms-plugin and
//     /usr/local/bin/kmsctl, built with the Dockerfile's flags.
//
// Usage (what `make image` runs):
//
//	go run ./build/image -out bin/image -version "$(git describe --tags --always --dirty)"
package main

import (
	"archive/tar"
	"bufio"
	"bytes"
	"compress/gzip"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/types"
	"github.com/ulikunitz/xz"
)

// Packages are the Debian packages whose files make the base layer: glibc
// and the GCC runtime libraries (vendor PKCS#11 modules that the plugin
// dlopens link against them) and the CA certificates.
var Packages = []string{"libc6", "libgcc-s1", "libstdc++6", "ca-certificates"}

// Paths under these prefixes of a package are left out: documentation,
// manual pages, translations, and update-ca-certificates (a shell script, and
// the image has no shell).
var excluded = []string{
	"usr/share/doc/", "usr/share/man/", "usr/share/info/", "usr/share/lintian/",
	"usr/share/locale/", "usr/share/bug/", "usr/sbin/update-ca-certificates",
}

const (
	binDir     = "usr/local/bin"
	nonrootUID = 65532
)

// Binaries are the commands the image carries, each as /usr/local/bin/NAME
// (as in the Dockerfile).
var Binaries = []string{"kms-plugin", "kmsctl"}

// Options says what to build.
type Options struct {
	Arch     string    // GOARCH and Debian architecture; only amd64 is built (docs/image.md)
	Version  string    // org.opencontainers.image.version and main.version
	Revision string    // org.opencontainers.image.revision (git commit)
	Created  time.Time // org.opencontainers.image.created and every file's mtime
	DebDir   string    // the .deb files of Packages
	BinDir   string    // the built kms-plugin and kmsctl
}

func main() {
	var (
		out      = flag.String("out", "bin/image", "OCI layout directory to write (replaced)")
		version  = flag.String("version", "", "image and binary version (default: git describe --tags --always --dirty)")
		revision = flag.String("revision", "", "git commit (default: git rev-parse HEAD)")
		debDir   = flag.String("debs", "", "cache directory of the Debian packages (default: the user cache directory)")
		arch     = flag.String("arch", "amd64", "architecture (only amd64; see docs/image.md)")
		fetch    = flag.Bool("fetch-only", false, "only download the Debian packages into the cache")
	)
	flag.Parse()
	if err := run(*out, *version, *revision, *debDir, *arch, *fetch); err != nil {
		fmt.Fprintln(os.Stderr, "image:", err)
		os.Exit(1)
	}
}

func run(out, version, revision, debDir, arch string, fetchOnly bool) error {
	if arch != "amd64" {
		return fmt.Errorf("architecture %q: only amd64 is built (cgo cross builds need a cross C toolchain; see docs/image.md)", arch)
	}
	if debDir == "" {
		debDir = DefaultDebDir(arch)
	}
	if _, err := FetchDebs(debDir, arch); err != nil {
		return err
	}
	if fetchOnly {
		fmt.Println(debDir)
		return nil
	}
	var err error
	if version == "" {
		if version, err = git("describe", "--tags", "--always", "--dirty"); err != nil {
			return err
		}
	}
	if revision == "" {
		if revision, err = git("rev-parse", "HEAD"); err != nil {
			return err
		}
	}
	created, err := SourceDate()
	if err != nil {
		return err
	}
	bins, err := os.MkdirTemp("", "kms-image-bin")
	if err != nil {
		return err
	}
	defer os.RemoveAll(bins)
	if err := BuildBinaries(".", bins, arch, version, revision); err != nil {
		return err
	}
	opts := Options{Arch: arch, Version: version, Revision: revision, Created: created, DebDir: debDir, BinDir: bins}
	img, err := Build(opts)
	if err != nil {
		return err
	}
	if err := WriteLayout(out, img, opts); err != nil {
		return err
	}
	d, err := img.Digest()
	if err != nil {
		return err
	}
	fmt.Printf("%s: %s %s/%s\n", out, d, "linux", arch)
	return nil
}

func git(args ...string) (string, error) {
	b, err := exec.Command("git", args...).Output()
	if err != nil {
		return "", fmt.Errorf("git %s: %w", strings.Join(args, " "), err)
	}
	return strings.TrimSpace(string(b)), nil
}

// SourceDate is SOURCE_DATE_EPOCH when set, else the time of the HEAD commit,
// so that the same commit gives the same image.
func SourceDate() (time.Time, error) {
	s := os.Getenv("SOURCE_DATE_EPOCH")
	if s == "" {
		var err error
		if s, err = git("log", "-1", "--format=%ct"); err != nil {
			return time.Time{}, err
		}
	}
	sec, err := strconv.ParseInt(s, 10, 64)
	if err != nil {
		return time.Time{}, fmt.Errorf("SOURCE_DATE_EPOCH %q: %w", s, err)
	}
	return time.Unix(sec, 0).UTC(), nil
}

// DefaultDebDir is where the packages are cached between builds.
func DefaultDebDir(arch string) string {
	if d := os.Getenv("KMS_IMAGE_DEBS"); d != "" {
		return d
	}
	base, err := os.UserCacheDir()
	if err != nil {
		base = os.TempDir()
	}
	return filepath.Join(base, "kms-plugin", "debs", arch)
}

// FetchDebs makes sure debDir has a .deb of each of Packages, downloading the
// missing ones with apt-get download (after one apt-get update if the first
// try fails), and returns their paths in the order of Packages.
func FetchDebs(debDir, arch string) ([]string, error) {
	if err := os.MkdirAll(debDir, 0o755); err != nil {
		return nil, err
	}
	var missing []string
	for _, p := range Packages {
		if f, _ := findDeb(debDir, p, arch); f == "" {
			missing = append(missing, p+":"+arch)
		}
	}
	if len(missing) > 0 {
		if _, err := exec.LookPath("apt-get"); err != nil {
			return nil, fmt.Errorf("Debian packages %s are not in %s and apt-get is not available: run `make image-debs` on a Debian or Ubuntu machine, or put their .deb files there", strings.Join(missing, " "), debDir)
		}
		download := func() error {
			cmd := exec.Command("apt-get", append([]string{"download", "-qq"}, missing...)...)
			cmd.Dir = debDir
			b, err := cmd.CombinedOutput()
			if err != nil {
				return fmt.Errorf("apt-get download %s: %v: %s", strings.Join(missing, " "), err, bytes.TrimSpace(b))
			}
			return nil
		}
		if err := download(); err != nil {
			if os.Geteuid() != 0 {
				return nil, fmt.Errorf("%w (run `make image-debs` as root, or `sudo apt-get update` first)", err)
			}
			if b, uerr := exec.Command("apt-get", "update", "-qq").CombinedOutput(); uerr != nil {
				return nil, fmt.Errorf("%w; apt-get update: %v: %s", err, uerr, bytes.TrimSpace(b))
			}
			if err := download(); err != nil {
				return nil, err
			}
		}
	}
	paths := make([]string, len(Packages))
	for i, p := range Packages {
		f, err := findDeb(debDir, p, arch)
		if err != nil {
			return nil, err
		}
		if f == "" {
			return nil, fmt.Errorf("%s: no .deb of %s after apt-get download", debDir, p)
		}
		paths[i] = f
	}
	return paths, nil
}

// findDeb returns the newest (by modification time) PKG_*_{ARCH,all}.deb in dir.
func findDeb(dir, pkg, arch string) (string, error) {
	var all []string
	for _, a := range []string{arch, "all"} {
		m, err := filepath.Glob(filepath.Join(dir, pkg+"_*_"+a+".deb"))
		if err != nil {
			return "", err
		}
		all = append(all, m...)
	}
	best, bestT := "", time.Time{}
	for _, f := range all {
		fi, err := os.Stat(f)
		if err != nil {
			return "", err
		}
		if best == "" || fi.ModTime().After(bestT) {
			best, bestT = f, fi.ModTime()
		}
	}
	return best, nil
}

// BuildBinaries builds Binaries from the module at root into outDir with the
// Dockerfile's flags: cgo on (the pkcs11 backend dlopens the vendor module),
// -trimpath, -s -w, and the version and commit stamped into main.version
// and main.commit, which `version` prints.
func BuildBinaries(root, outDir, arch, version, revision string) error {
	args := []string{"build", "-trimpath", "-ldflags", "-s -w -X main.version=" + version + " -X main.commit=" + revision, "-o", outDir + string(os.PathSeparator)}
	for _, b := range Binaries {
		args = append(args, "./cmd/"+b)
	}
	goBin := os.Getenv("GO")
	if goBin == "" {
		goBin = "go"
	}
	cmd := exec.Command(goBin, args...)
	cmd.Dir = root
	cmd.Env = append(os.Environ(), "CGO_ENABLED=1", "GOOS=linux", "GOARCH="+arch)
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("go %s: %w", strings.Join(args, " "), err)
	}
	return nil
}

// The image's user, entrypoint and command; the Dockerfile's USER,
// ENTRYPOINT and CMD must be the same (TestDockerfileInStep).
var (
	User       = fmt.Sprintf("%d:%d", nonrootUID, nonrootUID)
	Entrypoint = []string{"/" + binDir + "/kms-plugin"}
	Cmd        = []string{"serve", "--config", "/etc/kms-plugin/config.yaml"}
)

// Labels are the image's OCI annotations-as-labels.
func Labels(o Options) map[string]string {
	return map[string]string{
		"org.opencontainers.image.title":       "kms-plugin",
		"org.opencontainers.image.description": "Kubernetes KMS v2 plugin (kms-plugin) and its operator CLI (kmsctl)",
		"org.opencontainers.image.version":     o.Version,
		"org.opencontainers.image.revision":    o.Revision,
		"org.opencontainers.image.created":     o.Created.Format(time.RFC3339),
	}
}

// Build makes the image from the packages in o.DebDir and the binaries in o.BinDir.
func Build(o Options) (v1.Image, error) {
	debs, err := FetchDebs(o.DebDir, o.Arch)
	if err != nil {
		return nil, err
	}
	base, err := BaseLayer(debs, o.Created)
	if err != nil {
		return nil, err
	}
	app, err := AppLayer(o.BinDir, o.Created)
	if err != nil {
		return nil, err
	}
	// The history names the exact package files (name_version_arch.deb).
	debNames := make([]string, len(debs))
	for i, d := range debs {
		debNames[i] = filepath.Base(d)
	}
	img := mutate.MediaType(empty.Image, types.OCIManifestSchema1)
	img = mutate.ConfigMediaType(img, types.OCIConfigJSON)
	history := func(by string) mutate.Addendum {
		return mutate.Addendum{History: v1.History{Created: v1.Time{Time: o.Created}, CreatedBy: by}}
	}
	for _, a := range []struct {
		l  v1.Layer
		by string
	}{
		{base, "build/image: Debian packages " + strings.Join(debNames, " ") + "; nonroot user, CA bundle"},
		{app, "build/image: " + strings.Join(Binaries, " ")},
	} {
		add := history(a.by)
		add.Layer = a.l
		add.MediaType = types.OCILayer
		if img, err = mutate.Append(img, add); err != nil {
			return nil, err
		}
	}
	cf, err := img.ConfigFile()
	if err != nil {
		return nil, err
	}
	cf = cf.DeepCopy()
	cf.OS, cf.Architecture = "linux", o.Arch
	cf.Config.User = User
	cf.Config.WorkingDir = "/home/nonroot"
	cf.Config.Entrypoint = Entrypoint
	cf.Config.Cmd = Cmd
	cf.Config.Env = []string{
		"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
		"SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt",
	}
	cf.Config.Labels = Labels(o)
	if img, err = mutate.ConfigFile(img, cf); err != nil {
		return nil, err
	}
	return mutate.CreatedAt(img, v1.Time{Time: o.Created})
}

// WriteLayout replaces dir with an OCI layout holding img.
func WriteLayout(dir string, img v1.Image, o Options) error {
	if err := os.RemoveAll(dir); err != nil {
		return err
	}
	p, err := layout.Write(dir, empty.Index)
	if err != nil {
		return err
	}
	return p.AppendImage(img,
		layout.WithPlatform(v1.Platform{OS: "linux", Architecture: o.Arch}),
		layout.WithAnnotations(map[string]string{"org.opencontainers.image.ref.name": o.Version}))
}

// layerWriter writes a deterministic tar: every entry owned by root (unless
// said otherwise) with the one mtime, each path once, parents before children.
type layerWriter struct {
	tw    *tar.Writer
	mtime time.Time
	seen  map[string]byte // path -> typeflag
}

func newLayerWriter(w io.Writer, mtime time.Time) *layerWriter {
	return &layerWriter{tw: tar.NewWriter(w), mtime: mtime, seen: map[string]byte{}}
}

func (lw *layerWriter) dirs(p string) error {
	d := path.Dir(p)
	if d == "." || d == "/" {
		return nil
	}
	if _, ok := lw.seen[d]; ok {
		return nil
	}
	return lw.write(&tar.Header{Typeflag: tar.TypeDir, Name: d, Mode: 0o755}, nil)
}

func (lw *layerWriter) write(h *tar.Header, r io.Reader) error {
	name := strings.TrimSuffix(h.Name, "/")
	if t, ok := lw.seen[name]; ok {
		if t == tar.TypeDir && h.Typeflag == tar.TypeDir {
			return nil // a directory two packages share
		}
		return fmt.Errorf("%s: in the layer twice", name)
	}
	if err := lw.dirs(name); err != nil {
		return err
	}
	hdr := &tar.Header{
		Typeflag: h.Typeflag, Name: name, Linkname: h.Linkname, Mode: h.Mode & 0o7777,
		Uid: h.Uid, Gid: h.Gid, Size: h.Size, ModTime: lw.mtime, Format: tar.FormatPAX,
	}
	switch h.Typeflag {
	case tar.TypeDir:
		hdr.Name += "/"
		hdr.Size = 0
	case tar.TypeSymlink, tar.TypeLink:
		hdr.Size = 0
	case tar.TypeReg:
	default:
		return fmt.Errorf("%s: unsupported tar entry type %q", name, h.Typeflag)
	}
	lw.seen[name] = h.Typeflag
	if err := lw.tw.WriteHeader(hdr); err != nil {
		return err
	}
	if hdr.Typeflag == tar.TypeReg && r != nil {
		if _, err := io.Copy(lw.tw, r); err != nil {
			return err
		}
	}
	return nil
}

func (lw *layerWriter) file(name string, mode int64, uid int, data []byte) error {
	return lw.write(&tar.Header{Typeflag: tar.TypeReg, Name: name, Mode: mode, Uid: uid, Gid: uid, Size: int64(len(data))}, bytes.NewReader(data))
}

// layerFrom gzips a layer's tar once, at the fastest level (no name or time in the gzip header, so
// the same tar gives the same blob) and serves the layer from those bytes.
func layerFrom(data []byte) (v1.Layer, error) {
	var gz bytes.Buffer
	zw, err := gzip.NewWriterLevel(&gz, gzip.BestSpeed)
	if err != nil {
		return nil, err
	}
	if _, err := zw.Write(data); err != nil {
		return nil, err
	}
	if err := zw.Close(); err != nil {
		return nil, err
	}
	blob := gz.Bytes()
	return tarball.LayerFromOpener(func() (io.ReadCloser, error) {
		return io.NopCloser(bytes.NewReader(blob)), nil
	}, tarball.WithMediaType(types.OCILayer))
}

// Files the base layer adds itself (Debian's base-files and base-passwd, and
// ca-certificates' postinst, would make them; none of those run here).
const (
	passwd = "root:x:0:0:root:/root:/sbin/nologin\n" +
		"nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin\n" +
		"nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n"
	group = "root:x:0:\n" +
		"nobody:x:65534:\n" +
		"nonroot:x:65532:\n"
	nsswitch = "passwd: files\n" +
		"group: files\n" +
		"shadow: files\n" +
		"hosts: files dns\n" +
		"networks: files\n" +
		"protocols: files\n" +
		"services: files\n" +
		"ethers: files\n" +
		"rpc: files\n"
	caBundle = "etc/ssl/certs/ca-certificates.crt"
	caDir    = "usr/share/ca-certificates/"
)

// BaseLayer is the files of the packages (less the excluded paths) and the
// files their maintainer scripts would have made.
func BaseLayer(debs []string, mtime time.Time) (v1.Layer, error) {
	var buf bytes.Buffer
	lw := newLayerWriter(&buf, mtime)
	certs := map[string][]byte{}
	for _, deb := range debs {
		if err := addDeb(lw, deb, certs); err != nil {
			return nil, fmt.Errorf("%s: %w", filepath.Base(deb), err)
		}
	}
	if len(certs) == 0 {
		return nil, errors.New("no certificates under /" + caDir + " in the packages")
	}
	// update-ca-certificates (ca-certificates' postinst) concatenates the
	// selected certificates into the bundle; with the default selection
	// (every certificate the package ships) that is all of them, in order.
	names := make([]string, 0, len(certs))
	for n := range certs {
		names = append(names, n)
	}
	sort.Strings(names)
	var bundle bytes.Buffer
	for _, n := range names {
		c := certs[n]
		bundle.Write(c)
		if len(c) > 0 && c[len(c)-1] != '\n' {
			bundle.WriteByte('\n')
		}
	}
	for _, f := range []struct {
		name string
		data string
	}{
		{"etc/passwd", passwd}, {"etc/group", group}, {"etc/nsswitch.conf", nsswitch}, {caBundle, bundle.String()},
	} {
		if err := lw.file(f.name, 0o644, 0, []byte(f.data)); err != nil {
			return nil, err
		}
	}
	for _, d := range []struct {
		name string
		mode int64
		uid  int
	}{
		{"tmp", 0o1777, 0}, {"root", 0o700, 0}, {"home", 0o755, 0}, {"home/nonroot", 0o700, nonrootUID},
	} {
		if err := lw.write(&tar.Header{Typeflag: tar.TypeDir, Name: d.name, Mode: d.mode, Uid: d.uid, Gid: d.uid}, nil); err != nil {
			return nil, err
		}
	}
	if err := lw.tw.Close(); err != nil {
		return nil, err
	}
	return layerFrom(buf.Bytes())
}

// AppLayer is /usr/local/bin/kms-plugin and /usr/local/bin/kmsctl from dir.
func AppLayer(dir string, mtime time.Time) (v1.Layer, error) {
	var buf bytes.Buffer
	lw := newLayerWriter(&buf, mtime)
	for _, b := range Binaries {
		data, err := os.ReadFile(filepath.Join(dir, b))
		if err != nil {
			return nil, err
		}
		if err := lw.file(binDir+"/"+b, 0o755, 0, data); err != nil {
			return nil, err
		}
	}
	if err := lw.tw.Close(); err != nil {
		return nil, err
	}
	return layerFrom(buf.Bytes())
}

func isExcluded(name string) bool {
	for _, e := range excluded {
		if name == strings.TrimSuffix(e, "/") || strings.HasPrefix(name, e) {
			return true
		}
	}
	return false
}

// addDeb copies the data.tar of a .deb into the layer and collects the
// certificates under /usr/share/ca-certificates.
func addDeb(lw *layerWriter, deb string, certs map[string][]byte) error {
	f, err := os.Open(deb)
	if err != nil {
		return err
	}
	defer f.Close()
	name, data, err := arMember(bufio.NewReader(f), "data.tar")
	if err != nil {
		return err
	}
	var r io.Reader
	switch {
	case strings.HasSuffix(name, ".xz"):
		if r, err = xz.NewReader(data); err != nil {
			return err
		}
	case strings.HasSuffix(name, ".gz"):
		gz, err := gzip.NewReader(data)
		if err != nil {
			return err
		}
		defer gz.Close()
		r = gz
	case name == "data.tar":
		r = data
	default:
		return fmt.Errorf("%s: unsupported compression (xz, gzip or none)", name)
	}
	tr := tar.NewReader(r)
	for {
		h, err := tr.Next()
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return err
		}
		p := path.Clean(strings.TrimPrefix(h.Name, "./"))
		if p == "." || isExcluded(p) {
			continue
		}
		h.Name = p
		if h.Typeflag == tar.TypeLink {
			h.Linkname = path.Clean(strings.TrimPrefix(h.Linkname, "./"))
		}
		if h.Typeflag == tar.TypeReg && strings.HasPrefix(p, caDir) && strings.HasSuffix(p, ".crt") {
			b, err := io.ReadAll(tr)
			if err != nil {
				return err
			}
			certs[p] = b
			if err := lw.write(h, bytes.NewReader(b)); err != nil {
				return err
			}
			continue
		}
		if err := lw.write(h, tr); err != nil {
			return err
		}
	}
}

// arMember finds the first member of an ar archive (the container of a .deb:
// "!<arch>\n", then per member a 60-byte header and the data padded to an
// even length) whose name starts with prefix.
func arMember(r io.Reader, prefix string) (string, io.Reader, error) {
	magic := make([]byte, 8)
	if _, err := io.ReadFull(r, magic); err != nil || string(magic) != "!<arch>\n" {
		return "", nil, errors.New("not an ar archive")
	}
	hdr := make([]byte, 60)
	for {
		if _, err := io.ReadFull(r, hdr); err != nil {
			return "", nil, fmt.Errorf("no %s* member: %w", prefix, err)
		}
		if string(hdr[58:60]) != "`\n" {
			return "", nil, errors.New("bad ar member header")
		}
		name := strings.TrimSuffix(strings.TrimSpace(string(hdr[0:16])), "/")
		size, err := strconv.ParseInt(strings.TrimSpace(string(hdr[48:58])), 10, 64)
		if err != nil {
			return "", nil, fmt.Errorf("ar member %s size: %w", name, err)
		}
		if strings.HasPrefix(name, prefix) {
			return name, io.LimitReader(r, size), nil
		}
		if _, err := io.CopyN(io.Discard, r, size+size%2); err != nil {
			return "", nil, err
		}
	}
}
