package importrules_test

import (
	"encoding/json"
	"io"
	"os/exec"
	"slices"
	"strings"
	"testing"
)

const module = "github.com/llorch/llorch"

type pkg struct {
	ImportPath string
	Imports    []string
	Deps       []string
}

// list runs `go list -deps=false -json` over the module (without tests:
// the rules are about what ships).
func list(t *testing.T) map[string]pkg {
	t.Helper()
	cmd := exec.Command("go", "list", "-json", module+"/...")
	cmd.Dir = "../.."
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("go list: %v", err)
	}
	pkgs := map[string]pkg{}
	dec := json.NewDecoder(strings.NewReader(string(out)))
	for {
		var p pkg
		if err := dec.Decode(&p); err == io.EOF {
			break
		} else if err != nil {
			t.Fatal(err)
		}
		pkgs[strings.TrimPrefix(p.ImportPath, module+"/")] = p
	}
	return pkgs
}

func under(path, dir string) bool { return path == dir || strings.HasPrefix(path, dir+"/") }

// The rules, each one a sentence of docs/ARCHITECTURE.md.
func TestImportRules(t *testing.T) {
	pkgs := list(t)
	if len(pkgs) < 20 {
		t.Fatalf("only %d packages listed", len(pkgs))
	}
	for path, p := range pkgs {
		var own []string
		for _, imp := range p.Imports {
			if rel, ok := strings.CutPrefix(imp, module+"/"); ok {
				own = append(own, rel)
			}
		}
		// Nothing under edge/ links the control plane, smallstep or SQLite:
		// the agent on a GPU machine carries none of it.
		if under(path, "edge") {
			for _, dep := range p.Deps {
				rel := strings.TrimPrefix(dep, module+"/")
				if under(rel, "control") || strings.HasPrefix(dep, "github.com/smallstep/") || strings.HasPrefix(dep, "modernc.org/sqlite") {
					t.Errorf("%s links %s: the edge links no control-plane package, smallstep or SQLite", path, dep)
				}
			}
		}
		for _, imp := range own {
			// Only control dev's wiring (control/dev) links the edge from
			// the control plane's side.
			if under(path, "control") && under(imp, "edge") && path != "control/dev" {
				t.Errorf("%s imports %s: only control/dev may link the edge", path, imp)
			}
			// The control plane's adapters import no package above them.
			for _, upper := range []string{"control/api", "control/server", "control/cli", "control/dev"} {
				lower := slices.Contains([]string{"control/store", "control/pki", "control/enroll", "control/registry",
					"control/authz", "control/ratelimit", "control/connecterr", "control/metrics", "control/adminclient", "control"}, path)
				if lower && under(imp, upper) {
					t.Errorf("%s imports %s: adapters import no API, server, CLI or dev package", path, imp)
				}
			}
			// Shared packages belong to neither side.
			if (under(path, "certs") || under(path, "internal")) && (under(imp, "control") || under(imp, "edge")) {
				t.Errorf("%s imports %s: certs/ and internal/ are shared and import neither side", path, imp)
			}
		}
	}
	// The binaries: the edge's carries no control plane; the control
	// plane's carries the edge only through control/dev.
	edge := pkgs["edge/cmd/edge"]
	if !slices.Contains(edge.Deps, module+"/edge/agent") {
		t.Fatal("edge/cmd/edge does not link the agent: the listing is wrong")
	}
}
