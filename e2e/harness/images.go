package harness

import (
	"archive/tar"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"

	"github.com/moby/moby/api/types/build"
	"github.com/moby/moby/client"
)

// Test-only images, FROM scratch: nothing to pull, classic builder, no
// "# syntax=" line (BuildKit would fetch a frontend from a registry).
const (
	testkitDockerfile = `FROM scratch
COPY testkit /usr/local/bin/testkit
COPY edge /usr/local/bin/edge
ENTRYPOINT ["/usr/local/bin/testkit"]
CMD ["sleep"]
`
	toxiproxyDockerfile = `FROM scratch
COPY toxiproxy /toxiproxy
ENTRYPOINT ["/toxiproxy"]
CMD ["-host=0.0.0.0"]
`
)

// buildImages builds the control and edge images with the repository's
// Dockerfile (so the suites test it) and the two test-only images.
func (s *Suite) buildImages(ctx context.Context, bins string) error {
	tag := s.Name + "-" + s.RunID
	s.Images = Images{
		Control:   "llorch-test/control:" + tag,
		Edge:      "llorch-test/edge:" + tag,
		Testkit:   "llorch-test/testkit:" + tag,
		Toxiproxy: "llorch-test/toxiproxy:" + tag,
	}
	base := os.Getenv(EnvBase)
	if base == "" {
		base = "scratch"
	}
	if base != "scratch" {
		if _, err := s.Docker.ImageInspect(ctx, base); err != nil {
			return fmt.Errorf("%s=%s: the base image is not in the local store and this engine cannot pull it (import or load it first): %w", EnvBase, base, err)
		}
	}
	dockerfile, err := os.ReadFile(filepath.Join(s.Root, "Dockerfile"))
	if err != nil {
		return err
	}
	product := map[string]file{
		"Dockerfile":  {data: dockerfile, mode: 0o644},
		"bin/control": {path: filepath.Join(bins, "control"), mode: 0o755},
		"bin/edge":    {path: filepath.Join(bins, "edge"), mode: 0o755},
	}
	builds := []struct {
		ref, target string
		files       map[string]file
	}{
		{s.Images.Control, "control", product},
		{s.Images.Edge, "edge", product},
		{s.Images.Testkit, "", map[string]file{
			"Dockerfile": {data: []byte(testkitDockerfile), mode: 0o644},
			"testkit":    {path: filepath.Join(bins, "testkit"), mode: 0o755},
			"edge":       {path: filepath.Join(bins, "edge"), mode: 0o755},
		}},
		{s.Images.Toxiproxy, "", map[string]file{
			"Dockerfile": {data: []byte(toxiproxyDockerfile), mode: 0o644},
			"toxiproxy":  {path: filepath.Join(bins, "toxiproxy"), mode: 0o755},
		}},
	}
	for _, b := range builds {
		archive, err := tarball(b.files)
		if err != nil {
			return err
		}
		if err := s.buildImage(ctx, b.ref, b.target, base, archive); err != nil {
			return fmt.Errorf("build %s: %w", b.ref, err)
		}
	}
	return nil
}

// file is one entry of a build context: its content, or the path to read it from.
type file struct {
	data []byte
	path string
	mode int64
}

func tarball(files map[string]file) ([]byte, error) {
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for name, f := range files {
		data := f.data
		if f.path != "" {
			var err error
			if data, err = os.ReadFile(f.path); err != nil {
				return nil, err
			}
		}
		if err := tw.WriteHeader(&tar.Header{Name: name, Mode: f.mode, Size: int64(len(data)), Typeflag: tar.TypeReg}); err != nil {
			return nil, err
		}
		if _, err := tw.Write(data); err != nil {
			return nil, err
		}
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

// buildImage builds with the classic builder, which pulls nothing for
// FROM scratch, and fails on the first error the build stream reports.
func (s *Suite) buildImage(ctx context.Context, ref, target, base string, archive []byte) error {
	res, err := s.Docker.ImageBuild(ctx, bytes.NewReader(archive), client.ImageBuildOptions{
		Tags:        []string{ref},
		Target:      target,
		BuildArgs:   map[string]*string{"BASE": &base},
		Labels:      s.Labels(),
		Remove:      true,
		ForceRemove: true,
		Version:     build.BuilderV1,
	})
	if err != nil {
		return err
	}
	defer res.Body.Close()
	var log strings.Builder
	dec := json.NewDecoder(res.Body)
	for {
		var msg struct {
			Stream      string `json:"stream"`
			Error       string `json:"error"`
			ErrorDetail struct {
				Message string `json:"message"`
			} `json:"errorDetail"`
		}
		if err := dec.Decode(&msg); errors.Is(err, io.EOF) {
			return nil
		} else if err != nil {
			return fmt.Errorf("read build output: %w", err)
		}
		log.WriteString(msg.Stream)
		if msg.Error != "" {
			return fmt.Errorf("%s\n%s", msg.Error, log.String())
		}
	}
}
