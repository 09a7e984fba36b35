//go:build !cgo

package gpu_test

import (
	"strings"
	"testing"

	"github.com/llorch/llorch/edge/gpu"
)

func TestNewNVMLWithoutCgo(t *testing.T) {
	src := gpu.NewNVML(nil)
	inv := src.Inventory(t.Context())
	if !strings.Contains(inv.Unavailable, "built without cgo") || len(inv.Devices) != 0 {
		t.Errorf("inventory = %+v, want no devices and Unavailable saying built without cgo", inv)
	}
	if err := src.Close(); err != nil {
		t.Errorf("Close: %v", err)
	}
}
