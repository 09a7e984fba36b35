// Package importrules holds the test that enforces the import rules
// docs/ARCHITECTURE.md states ("Import rules"): which of the module's
// packages may link which. It has no code of its own.
package importrules
