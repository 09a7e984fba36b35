package harness

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strconv"
	"syscall"

	cerrdefs "github.com/containerd/errdefs"
	"github.com/moby/moby/client"
)

func isNotFound(err error) bool { return cerrdefs.IsNotFound(err) }

// sweepFilter picks what a sweep removes.
type sweepFilter struct {
	label      string                       // label filter for the engine ("k=v")
	keep       func(map[string]string) bool // true: leave it
	keepImages bool                         // leave images alone
	describe   string                       // for messages
}

// staleRuns selects what runs of this suite left behind when their process
// is gone (killed, or a go test -timeout panic that skipped the cleanups).
// Runs whose process is alive are someone else's and are left alone.
func staleRuns(suite string) sweepFilter {
	return sweepFilter{
		label:    LabelSuite + "=" + suite,
		keep:     func(l map[string]string) bool { return processAlive(l[LabelPID]) },
		describe: "left by an earlier " + suite + " run",
	}
}

// thisRun selects everything this run created.
func thisRun(runID string) sweepFilter {
	return sweepFilter{label: LabelRun + "=" + runID, keep: func(map[string]string) bool { return false }, describe: "of this run"}
}

func processAlive(pid string) bool {
	n, err := strconv.Atoi(pid)
	if err != nil || n <= 0 {
		return false
	}
	if n == os.Getpid() {
		return true
	}
	err = syscall.Kill(n, 0)
	return err == nil || errors.Is(err, syscall.EPERM)
}

// sweep force-removes containers, then networks and volumes, then images
// matching f. It reports what it could not remove.
func (s *Suite) sweep(ctx context.Context, f sweepFilter) error {
	var errs []error
	filters := client.Filters{}.Add("label", f.label)
	removed := 0
	cs, err := s.Docker.ContainerList(ctx, client.ContainerListOptions{All: true, Filters: filters})
	if err != nil {
		return fmt.Errorf("list containers: %w", err)
	}
	for _, c := range cs.Items {
		if f.keep(c.Labels) {
			continue
		}
		if _, err := s.Docker.ContainerRemove(ctx, c.ID, client.ContainerRemoveOptions{Force: true, RemoveVolumes: true}); err != nil && !isNotFound(err) {
			errs = append(errs, fmt.Errorf("remove container %s: %w", c.ID[:12], err))
			continue
		}
		removed++
	}
	ns, err := s.Docker.NetworkList(ctx, client.NetworkListOptions{Filters: filters})
	if err != nil {
		return fmt.Errorf("list networks: %w", err)
	}
	for _, n := range ns.Items {
		if f.keep(n.Labels) {
			continue
		}
		if _, err := s.Docker.NetworkRemove(ctx, n.ID, client.NetworkRemoveOptions{}); err != nil && !isNotFound(err) {
			errs = append(errs, fmt.Errorf("remove network %s: %w", n.Name, err))
			continue
		}
		removed++
	}
	vs, err := s.Docker.VolumeList(ctx, client.VolumeListOptions{Filters: filters})
	if err != nil {
		return fmt.Errorf("list volumes: %w", err)
	}
	for _, v := range vs.Items {
		if f.keep(v.Labels) {
			continue
		}
		if _, err := s.Docker.VolumeRemove(ctx, v.Name, client.VolumeRemoveOptions{Force: true}); err != nil && !isNotFound(err) {
			errs = append(errs, fmt.Errorf("remove volume %s: %w", v.Name, err))
			continue
		}
		removed++
	}
	if !f.keepImages {
		is, err := s.Docker.ImageList(ctx, client.ImageListOptions{Filters: filters})
		if err != nil {
			return fmt.Errorf("list images: %w", err)
		}
		for _, im := range is.Items {
			if f.keep(im.Labels) {
				continue
			}
			if _, err := s.Docker.ImageRemove(ctx, im.ID, client.ImageRemoveOptions{Force: true, PruneChildren: true}); err != nil && !isNotFound(err) {
				errs = append(errs, fmt.Errorf("remove image %s: %w", im.ID, err))
				continue
			}
			removed++
		}
	}
	if removed > 0 {
		fmt.Printf("%s: removed %d containers, networks, volumes and images %s\n", s.Name, removed, f.describe)
	}
	return errors.Join(errs...)
}
