package certs_test

import (
	"errors"
	"strings"
	"testing"

	"github.com/llorch/llorch/certs"
)

const fp = "sha256:618553813cd582c39327351d451bc92ce165b979065c6fc1649893d497007120"

func TestJoinTokenRoundTrip(t *testing.T) {
	tok, err := certs.NewJoinToken(fp)
	if err != nil {
		t.Fatal(err)
	}
	parsed, err := certs.ParseJoinToken(" " + tok.String() + "\n")
	if err != nil {
		t.Fatalf("parse %q: %v", tok.String(), err)
	}
	if parsed != tok {
		t.Fatalf("round trip: %+v, want %+v", parsed, tok)
	}
	other, _ := certs.NewJoinToken(fp)
	if other.ID == tok.ID || other.Secret == tok.Secret {
		t.Fatal("two tokens share an ID or a secret")
	}
	if string(tok.SecretHash()) == string(other.SecretHash()) {
		t.Fatal("two secrets hash alike")
	}
}

func TestNewJoinTokenBadFingerprint(t *testing.T) {
	for _, bad := range []string{"", "sha256:abc", strings.ToUpper(fp), "md5:" + fp[7:]} {
		if _, err := certs.NewJoinToken(bad); err == nil {
			t.Errorf("NewJoinToken(%q) succeeded", bad)
		}
	}
}

func TestParseJoinTokenRejects(t *testing.T) {
	good, _ := certs.NewJoinToken(fp)
	s := good.String()
	parts := strings.Split(s, ".")
	tests := []struct{ name, in string }{
		{"empty", ""},
		{"garbage", "hello"},
		{"truncated", s[:len(s)-1]},
		{"too long", s + "a"},
		{"wrong prefix", "llorch2" + s[len("llorch1"):]},
		{"short fingerprint", strings.Join([]string{parts[0], parts[1][:63], parts[2], parts[3]}, ".")},
		{"uppercase fingerprint", strings.Join([]string{parts[0], strings.ToUpper(parts[1]), parts[2], parts[3]}, ".")},
		{"non-hex fingerprint", strings.Join([]string{parts[0], "z" + parts[1][1:], parts[2], parts[3]}, ".")},
		{"bad id char", strings.Join([]string{parts[0], parts[1], "1" + parts[2][1:], parts[3]}, ".")},
		{"bad secret char", strings.Join([]string{parts[0], parts[1], parts[2], "!" + parts[3][1:]}, ".")},
		{"extra part", s + ".x"},
		{"inner space", strings.Replace(s, ".", ". ", 1)},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if _, err := certs.ParseJoinToken(tt.in); !errors.Is(err, certs.ErrMalformedToken) {
				t.Fatalf("ParseJoinToken(%q) = %v, want ErrMalformedToken", tt.in, err)
			}
		})
	}
}

// FuzzParseJoinToken: parsing never panics, and whatever parses prints back
// as the (trimmed) input and re-parses to the same token.
func FuzzParseJoinToken(f *testing.F) {
	good, _ := certs.NewJoinToken(fp)
	for _, seed := range []string{good.String(), good.String()[:50], "", "llorch1....", "llorch1." + fp[7:] + ".aaaaaaaaaaaa." + strings.Repeat("a", 32)} {
		f.Add(seed)
	}
	f.Fuzz(func(t *testing.T, in string) {
		tok, err := certs.ParseJoinToken(in)
		if err != nil {
			if !errors.Is(err, certs.ErrMalformedToken) {
				t.Fatalf("error %v does not wrap ErrMalformedToken", err)
			}
			return
		}
		if tok.String() != strings.TrimSpace(in) {
			t.Fatalf("String() = %q, input %q", tok.String(), in)
		}
		again, err := certs.ParseJoinToken(tok.String())
		if err != nil || again != tok {
			t.Fatalf("re-parse: %+v, %v", again, err)
		}
	})
}
