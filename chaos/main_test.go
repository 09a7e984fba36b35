package chaos

import (
	"os"
	"testing"
	"time"

	"github.com/llorch/llorch/e2e/harness"
)

var suite *harness.Suite

func TestMain(m *testing.M) {
	os.Setenv("TESTCONTAINERS_RYUK_DISABLED", "true") // Ryuk cannot be pulled; set before any testcontainers call
	os.Exit(harness.Main(m, harness.Config{Name: "chaos", Gate: "LLORCH_CHAOS", Seeded: true}, &suite))
}

// The timing most scenarios run their control plane with. Bounds never read
// these: they are functions of the fleet's options (bounds.go), so a
// scenario that runs with other settings gets bounds for those.
const (
	heartbeat    = time.Second
	offlineAfter = 3 * time.Second
)
