package handoff

// ReadFile is readFile, for the test that a FIFO is refused once open.
var ReadFile = readFile
