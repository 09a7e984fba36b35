package api

import (
	"errors"
	"io"
	"strings"
	"testing"
)

// A body read after wait yields exactly what the edge sent, in order.
func TestSessionBodyWaitThenRead(t *testing.T) {
	b := &sessionBody{ReadCloser: io.NopCloser(strings.NewReader("hello, control plane"))}
	b.wait()
	b.wait() // a second wait with a byte buffered reads nothing more
	got, err := io.ReadAll(b)
	if err != nil || string(got) != "hello, control plane" {
		t.Fatalf("read %q, %v", got, err)
	}
}

// A failure seen by wait is what the next Read returns, every time.
func TestSessionBodyWaitError(t *testing.T) {
	failure := errors.New("read deadline exceeded")
	b := &sessionBody{ReadCloser: io.NopCloser(failingReader{failure})}
	b.wait()
	for range 2 {
		if n, err := b.Read(make([]byte, 8)); n != 0 || !errors.Is(err, failure) {
			t.Fatalf("Read after a failed wait: %d, %v", n, err)
		}
	}
	if n, err := b.Read(nil); n != 0 || err != nil {
		t.Fatalf("empty Read: %d, %v", n, err)
	}
}

type failingReader struct{ err error }

func (f failingReader) Read([]byte) (int, error) { return 0, f.err }
