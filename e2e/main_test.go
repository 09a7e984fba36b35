package e2e

import (
	"os"
	"testing"

	"github.com/llorch/llorch/e2e/harness"
)

var suite *harness.Suite

func TestMain(m *testing.M) {
	os.Setenv("TESTCONTAINERS_RYUK_DISABLED", "true") // Ryuk cannot be pulled; set before any testcontainers call
	os.Exit(harness.Main(m, harness.Config{Name: "e2e", Gate: "LLORCH_E2E"}, &suite))
}
