package chaos

import (
	"testing"
	"time"

	"github.com/llorch/llorch/e2e/harness"
)

// The figures the bounds' comments show, so that they stay true. Runs
// without Docker.
func TestBoundsArithmetic(t *testing.T) {
	usual := harness.FleetOptions{HeartbeatInterval: time.Second, OfflineAfter: 3 * time.Second,
		RegistrationRate: harness.DefaultRegistrationRate, RegistrationBurst: harness.DefaultRegistrationBurst}
	paced := usual
	paced.RegistrationRate, paced.RegistrationBurst = 8, 2
	slow := usual
	slow.HeartbeatInterval, slow.OfflineAfter = 30*time.Second, 90*time.Second
	ms := time.Millisecond
	for _, tc := range []struct {
		name      string
		got, want time.Duration
	}{
		{"backoff ceiling, 1s heartbeat", backoffCeiling(usual), time.Second},
		{"backoff ceiling, 30s heartbeat", backoffCeiling(slow), 10 * time.Second},
		{"sweep tick", sweepTick(usual), 500 * ms},
		{"detect", detectBound(usual), 6 * time.Second},
		{"detect, 30s heartbeat", detectBound(slow), 90*time.Second + 30*time.Second + time.Second + loadSlack},
		{"detect floor", detectFloor(usual), 500 * ms},
		{"pacing, 3 nodes at 1000/s", pacing(usual, 3), 0},
		{"pacing, 10 nodes at 8/s", pacing(paced, 10), time.Second},
		{"paced return, 3 nodes at 1000/s", pacedReturn(usual, 3), 0},
		{"paced return, 10 nodes at 8/s", pacedReturn(paced, 10), 2125 * ms},
		{"paced return, 10100 nodes at 1000/s", pacedReturn(usual, 10100), 10*time.Second + 10*time.Second + ms},
		{"spread, 10 nodes", reconnectSpread(10), time.Second},
		{"spread, 5000 nodes", reconnectSpread(5000), 5 * time.Second},
		{"spread, 50000 nodes", reconnectSpread(50000), 10 * time.Second},
		{"shutdown hint, 10 nodes", shutdownHintMax(10), 3 * time.Second},
		{"online after heal, 3 nodes", onlineAfterHeal(usual, 3), 4 * time.Second},
		{"online after kill -9, 3 nodes", onlineAfterRestart(usual, 3, 0), 6 * time.Second},
		{"online after SIGTERM, 10 nodes at 8/s", onlineAfterRestart(paced, 10, shutdownHintMax(10)), 8125 * ms},
		{"edge back", edgeBack(), 5 * time.Second},
		{"hint window floor, 10 nodes", hintWindowFloor(10).Round(ms), 288 * ms},
		{"restart spread floor, 10 nodes at 8/s", restartSpreadFloor(paced, 10, true), 900 * ms},
		{"goodbye written", goodbyeWritten(), 6500 * ms},
	} {
		if tc.got != tc.want {
			t.Errorf("%s: %s, want %s", tc.name, tc.got, tc.want)
		}
	}
	for _, tc := range []struct {
		name      string
		got, want int
	}{
		{"paced at most, 100ms at 8/s", pacedAtMost(paced, 100*ms), 3},
		{"paced at most, 1s at 8/s", pacedAtMost(paced, time.Second), 10},
		{"flush errors in 3s", flushErrorsAtMost(3 * time.Second), 1},
		{"flush errors in 11s", flushErrorsAtMost(11 * time.Second), 3},
	} {
		if tc.got != tc.want {
			t.Errorf("%s: %d, want %d", tc.name, tc.got, tc.want)
		}
	}
}
