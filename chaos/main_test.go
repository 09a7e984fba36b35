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

// Timing every scenario runs with (unless it says otherwise), and the edge's
// reconnect backoff ceiling (edge/session: full jitter, 500ms..10s).
const (
	heartbeat    = time.Second
	offlineAfter = 3 * time.Second
	backoffMax   = 10 * time.Second
)

// detectBound is how soon a silent node must be offline: the threshold,
// plus one heartbeat interval (its last heartbeat may predate the fault by
// that much), plus a second for the sweep tick and the event write.
func detectBound(offline time.Duration) time.Duration { return offline + heartbeat + time.Second }

// reconnectBound is how soon a node must be online after its path is back:
// the longest reconnect backoff, plus a handshake and a heartbeat, plus slack.
const reconnectBound = backoffMax + 3*time.Second
