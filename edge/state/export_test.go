package state

// Hooks for crash simulations in state_test.
var (
	WriteGeneration = writeGeneration
	SwapCurrent     = swapCurrent
)
