// Package chaos is the fault-injection suite: the real binaries in
// containers (see e2e/harness), with partitions, kill -9, freezes, network
// toxics, a full disk and partitions in the middle of an enrollment. Each
// scenario injects a fault, heals it, and checks invariants with bounds,
// printing one line per invariant and a table at the end. It runs only
// with LLORCH_CHAOS=1 (`go tool task chaos`, or `chaos:ci` for the
// bounded subset CI runs); plain `go test ./...` skips it.
package chaos
