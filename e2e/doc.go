// Package e2e is the end-to-end suite: the real control and edge binaries,
// in the images the repository's Dockerfile builds, run in containers on a
// NAT-like topology (see the harness package). It runs only with
// LLORCH_E2E=1 (`go tool task e2e`); plain `go test ./...` skips it.
//
// Beside it, edgesim (e2e/edgesim) is the fleet load tool: thousands of
// simulated edges against the real control-plane binary. Like the suites it
// drives both sides, so it belongs to neither control/ nor edge/.
package e2e
