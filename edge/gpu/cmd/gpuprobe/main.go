// Command gpuprobe prints this machine's GPU inventory as the edge would
// report it, as JSON, for a one-shot check on a GPU host. It exits 0 even when
// NVML is unavailable; the reason is in the "Unavailable" field.
package main

import (
	"context"
	"encoding/json"
	"log/slog"
	"os"
	"time"

	"github.com/llorch/llorch/edge/gpu"
)

func main() {
	logger := slog.New(slog.NewTextHandler(os.Stderr, nil))
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()

	src := gpu.NewNVML(logger)
	inv := src.Inventory(ctx)
	if err := src.Close(); err != nil {
		logger.Warn("close NVML", "err", err)
	}

	enc := json.NewEncoder(os.Stdout)
	enc.SetIndent("", "  ")
	if err := enc.Encode(inv); err != nil {
		logger.Error("write inventory", "err", err)
		os.Exit(1)
	}
}
