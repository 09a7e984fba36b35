//go:build !cgo

package gpu

import (
	"context"
	"log/slog"
)

// noCgoReason is what a build without cgo reports.
const noCgoReason = "built without cgo: NVML needs a cgo build (see edge/gpu/README.md)"

// NewNVML returns a Source that reports no GPUs: go-nvml does not compile
// without cgo, so this build cannot read them.
func NewNVML(logger *slog.Logger) Source {
	if logger != nil {
		logger.Warn("GPU inventory unavailable", "reason", noCgoReason)
	}
	return unavailable{reason: noCgoReason}
}

// unavailable is a Source that always reports the same reason.
type unavailable struct{ reason string }

func (u unavailable) Inventory(context.Context) Inventory { return Inventory{Unavailable: u.reason} }

func (unavailable) Close() error { return nil }
