//go:build cgo

package gpu

import (
	"log/slog"

	"github.com/NVIDIA/go-nvml/pkg/nvml"

	"github.com/llorch/llorch/internal/clock"
)

// InitRetryInterval is how long a Source waits between Init attempts.
const InitRetryInterval = initRetryInterval

// FromInterfaceWithClock is FromInterface reading time from clk.
func FromInterfaceWithClock(lib nvml.Interface, logger *slog.Logger, clk clock.Clock) Source {
	return newSource(lib, logger, clk)
}
