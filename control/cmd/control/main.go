// Command control is the llorch control plane and its admin CLI.
package main

import (
	"context"
	"os"
	"os/signal"
	"syscall"

	"github.com/llorch/llorch/control/cli"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := cli.Main(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}
