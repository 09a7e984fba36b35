// Package version names the build; `task build` sets Version with -ldflags.
package version

// Version is the release, or "dev" for builds outside `task build`.
var Version = "dev"
