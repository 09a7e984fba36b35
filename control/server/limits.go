package server

import (
	"compress/gzip"
	"context"
	"errors"
	"fmt"
	"io"
	"math"
	"net/http"
	"strings"
	"syscall"
	"time"
	"unicode"

	"connectrpc.com/connect"

	"github.com/llorch/llorch/control/authz"
	"github.com/llorch/llorch/control/ratelimit"
	"github.com/llorch/llorch/internal/gen/llorch/v1/llorchv1connect"
)

// Limits bound what a caller can make the control plane hold (connections,
// buffers, streams) and do (enrollments, sessions, renewals, credential
// guesses). Each is documented with its default in docs/ARCHITECTURE.md
// ("Limits") and has a flag on `control serve`. Zero values mean "the
// default" for the caps and timeouts, and "no limit" for the rate limits.
type Limits struct {
	// MaxConns caps the public port's connections: beyond it a new one is
	// closed at once. It is lowered to the process's file limit minus
	// FDReserve, so the store and the admin socket always have descriptors.
	MaxConns int
	// MaxUnauthenticatedConns caps connections still in their TLS handshake
	// or without a client certificate (enrollment, API clients, anyone);
	// MaxUnauthenticatedConnsPerAddr caps them per source address (an IPv6
	// /64). Edges, which hold certificates, have the rest of MaxConns.
	MaxUnauthenticatedConns        int
	MaxUnauthenticatedConnsPerAddr int
	// HandshakeTimeout bounds a new connection's TLS handshake.
	HandshakeTimeout time.Duration
	// IdleTimeout closes a connection without a client certificate that
	// has carried no request for this long.
	IdleTimeout time.Duration
	// BodyTimeout bounds how long a request's body may take to arrive, from
	// its headers (every request but the edge session's stream).
	BodyTimeout time.Duration
	// Enroll limits enrollment attempts per source address.
	Enroll ratelimit.Limit
	// AuthFailures limits refused credentials (API tokens, join tokens) per
	// source address; an address over it is refused before its credential
	// is checked.
	AuthFailures ratelimit.Limit
	// NodeSessions limits how often one node may open a session; zero Rate:
	// one per heartbeat interval, in bursts of 10.
	NodeSessions ratelimit.Limit
	// NodeRenewals limits one node's certificate renewals.
	NodeRenewals ratelimit.Limit
}

// Defaults, sized for a control plane of 100,000 edges.
const (
	DefaultMaxConns                       = 110_000
	DefaultMaxUnauthenticatedConns        = 4096
	DefaultMaxUnauthenticatedConnsPerAddr = 64
	DefaultHandshakeTimeout               = 10 * time.Second
	DefaultIdleTimeout                    = 30 * time.Second
	DefaultBodyTimeout                    = 30 * time.Second
	// FDReserve is what MaxConns leaves of the file limit: the store's
	// files, the admin socket and its clients, logs, the CA's files.
	FDReserve = 512

	DefaultEventRetention = 30 * 24 * time.Hour
	DefaultMaxEvents      = 1_000_000
)

// DefaultLimits returns the defaults: caps as above; enrollment bursts of
// 100 machines from one address, then 2 a second; 10 refused credentials
// per address, then one per 6 s; a node's sessions one per heartbeat
// interval in bursts of 10; its renewals 5 at once, then one a minute.
func DefaultLimits() Limits {
	return Limits{
		MaxConns:                       DefaultMaxConns,
		MaxUnauthenticatedConns:        DefaultMaxUnauthenticatedConns,
		MaxUnauthenticatedConnsPerAddr: DefaultMaxUnauthenticatedConnsPerAddr,
		HandshakeTimeout:               DefaultHandshakeTimeout,
		IdleTimeout:                    DefaultIdleTimeout,
		BodyTimeout:                    DefaultBodyTimeout,
		Enroll:                         ratelimit.Limit{Rate: 2, Burst: 100},
		AuthFailures:                   ratelimit.Every(6*time.Second, 10),
		NodeRenewals:                   ratelimit.Every(time.Minute, 5),
	}
}

// Validate checks the limits.
func (l Limits) Validate() error {
	for _, n := range []int{l.MaxConns, l.MaxUnauthenticatedConns, l.MaxUnauthenticatedConnsPerAddr} {
		if n < 0 {
			return errors.New("connection limits must not be negative")
		}
	}
	if l.HandshakeTimeout < 0 || l.IdleTimeout < 0 || l.BodyTimeout < 0 {
		return errors.New("timeouts must not be negative")
	}
	for _, r := range []ratelimit.Limit{l.Enroll, l.AuthFailures, l.NodeSessions, l.NodeRenewals} {
		if r.Rate < 0 || r.Burst < 0 {
			return errors.New("rate limits must not be negative")
		}
	}
	return nil
}

// withDefaults fills in the zero caps and timeouts, and the node session
// limit from the heartbeat interval, and lowers MaxConns to what the file
// limit allows (saying so in note when it had to).
func (l Limits) withDefaults(heartbeat time.Duration) (_ Limits, note string) {
	def := DefaultLimits()
	if l.MaxConns == 0 {
		l.MaxConns = def.MaxConns
	}
	if l.MaxUnauthenticatedConns == 0 {
		l.MaxUnauthenticatedConns = def.MaxUnauthenticatedConns
	}
	if l.MaxUnauthenticatedConnsPerAddr == 0 {
		l.MaxUnauthenticatedConnsPerAddr = def.MaxUnauthenticatedConnsPerAddr
	}
	if l.HandshakeTimeout == 0 {
		l.HandshakeTimeout = def.HandshakeTimeout
	}
	if l.IdleTimeout == 0 {
		l.IdleTimeout = def.IdleTimeout
	}
	if l.BodyTimeout == 0 {
		l.BodyTimeout = def.BodyTimeout
	}
	if l.AuthFailures.Burst == 0 {
		l.AuthFailures = ratelimit.Limit{}
	}
	if l.NodeSessions.Rate == 0 {
		l.NodeSessions = ratelimit.Every(heartbeat, 10)
	}
	var rl syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &rl); err == nil && rl.Cur < math.MaxInt32 {
		if room := int(rl.Cur) - FDReserve; room < l.MaxConns {
			note = fmt.Sprintf("the file limit (%d) allows %d connections on the public port, not %d; raise it (ulimit -n, systemd LimitNOFILE) for a larger fleet", rl.Cur, max(room, 1), l.MaxConns)
			l.MaxConns = max(room, 1)
		}
	}
	l.MaxUnauthenticatedConns = min(l.MaxUnauthenticatedConns, l.MaxConns)
	l.MaxUnauthenticatedConnsPerAddr = min(l.MaxUnauthenticatedConnsPerAddr, l.MaxUnauthenticatedConns)
	return l, note
}

// MinAPITokenBits is the least an API token must carry.
const MinAPITokenBits = 128

// CheckAPIToken refuses an API token that is not long and random enough to
// be a secret: it must carry MinAPITokenBits, estimated as its length times
// the bits of the smallest usual alphabet that holds all its characters
// (hex, base32, base64 ...), and must not be whitespace or a repeated
// character or pattern.
func CheckAPIToken(token string) error {
	const hint = "generate one with: openssl rand -hex 32"
	switch {
	case strings.TrimSpace(token) != token || strings.IndexFunc(token, unicode.IsSpace) >= 0:
		return fmt.Errorf("LLORCH_API_TOKEN contains whitespace (a newline from a file?): use a token without spaces; %s", hint)
	case strings.IndexFunc(token, func(r rune) bool { return r > unicode.MaxASCII || !unicode.IsPrint(r) }) >= 0:
		return fmt.Errorf("LLORCH_API_TOKEN contains characters other than printable ASCII; %s", hint)
	}
	distinct := map[rune]bool{}
	for _, r := range token {
		distinct[r] = true
	}
	if len(distinct) < 8 || periodic(token) {
		return fmt.Errorf("LLORCH_API_TOKEN is not random (a repeated character or pattern); %s", hint)
	}
	if bits := float64(len(token)) * math.Log2(float64(alphabetSize(token))); bits < MinAPITokenBits {
		return fmt.Errorf("LLORCH_API_TOKEN is too weak: about %.0f bits, at least %d needed (32 hex characters, 22 of base64); %s", bits, MinAPITokenBits, hint)
	}
	return nil
}

// periodic says whether s is one shorter string repeated.
func periodic(s string) bool {
	for p := 1; p <= len(s)/2; p++ {
		if len(s)%p == 0 && strings.Repeat(s[:p], len(s)/p) == s {
			return true
		}
	}
	return false
}

// alphabetSize is the size of the smallest usual token alphabet holding
// every character of s.
func alphabetSize(s string) int {
	in := func(set string) bool {
		for _, r := range s {
			if !strings.ContainsRune(set, r) {
				return false
			}
		}
		return true
	}
	const (
		digits = "0123456789"
		lower  = "abcdefghijklmnopqrstuvwxyz"
		upper  = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
	)
	switch {
	case in(digits):
		return 10
	case in(digits + "abcdef"), in(digits + "ABCDEF"):
		return 16
	case in(lower + "234567="), in(upper + "234567="):
		return 32
	case in(digits + lower), in(digits + upper):
		return 36
	case in(digits + lower + upper):
		return 62
	case in(digits + lower + upper + "+/=-_"):
		return 64
	}
	return 94
}

// boundRequests bounds every request but the edge session's stream (whose
// deadlines the session keeps itself, api.SessionHTTP): its body must have
// arrived within the body timeout of its headers, and a request that needed
// no credential must be over by then. The gate has run: the caller is known.
func boundRequests(next http.Handler, timeout time.Duration) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == llorchv1connect.SessionServiceConnectProcedure {
			next.ServeHTTP(w, r)
			return
		}
		ctl := http.NewResponseController(w)
		if ctl.SetReadDeadline(time.Now().Add(timeout)) == nil {
			r.Body = &deadlineBody{ReadCloser: r.Body, ctl: ctl}
		}
		if c, ok := authz.CallerFrom(r.Context()); ok && c.Policy == authz.Public {
			ctx, cancel := context.WithTimeout(r.Context(), timeout)
			defer cancel()
			r = r.WithContext(ctx)
		}
		next.ServeHTTP(w, r)
	})
}

// deadlineBody lifts the read deadline once the body has been read to its
// end: a response that streams on for longer (WatchEvents) is not cut off,
// and HTTP/1.1's check for a closed connection does not time out.
type deadlineBody struct {
	io.ReadCloser
	ctl  *http.ResponseController
	done bool
}

func (b *deadlineBody) Read(p []byte) (int, error) {
	n, err := b.ReadCloser.Read(p)
	if errors.Is(err, io.EOF) && !b.done {
		b.done = true
		b.ctl.SetReadDeadline(time.Time{})
	}
	return n, err
}

// cappedGzip is gzip for request messages that stops decompressing one byte
// past MaxMessageBytes. Connect refuses a message over its read limit with
// resource_exhausted, but counts the rest of a compressed one by
// decompressing it to the end: a few kilobytes of gzip can stand for
// gigabytes, and this way they cost a megabyte of work, not seconds of CPU.
func cappedGzip() connect.HandlerOption {
	return connect.WithCompression("gzip",
		func() connect.Decompressor { return &cappedDecompressor{limit: MaxMessageBytes + 1} },
		func() connect.Compressor { return gzip.NewWriter(io.Discard) },
	)
}

var errDecompressedTooLarge = fmt.Errorf("message is larger than %d bytes when decompressed", MaxMessageBytes)

type cappedDecompressor struct {
	gz    gzip.Reader
	limit int64
	left  int64
}

func (d *cappedDecompressor) Read(p []byte) (int, error) {
	if d.left <= 0 {
		return 0, errDecompressedTooLarge
	}
	if int64(len(p)) > d.left {
		p = p[:d.left]
	}
	n, err := d.gz.Read(p)
	d.left -= int64(n)
	return n, err
}

func (d *cappedDecompressor) Close() error { return d.gz.Close() }

func (d *cappedDecompressor) Reset(r io.Reader) error {
	d.left = d.limit
	return d.gz.Reset(r)
}
