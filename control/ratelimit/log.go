package ratelimit

import (
	"context"
	"log/slog"
	"sync"
	"time"

	"github.com/llorch/llorch/internal/clock"
)

// DefaultLogLimit is how many refusals a Log writes: a steady 10 lines a
// second at most, 100 at once.
var DefaultLogLimit = Limit{Rate: 10, Burst: 100}

// Log writes refusals (of credentials, of connections) at WARN level, each
// once, as long as they come slower than its limit; beyond it they are
// counted, and the count is written in one line with the next refusal
// that gets through. So a flood of bad requests cannot fill the disk, and
// the operator still sees that it happened.
type Log struct {
	log   *slog.Logger
	limit Limit
	clock clock.Clock

	mu         sync.Mutex
	tokens     float64
	last       time.Time
	suppressed int
}

// NewLog returns a Log writing to log at most l (zero: DefaultLogLimit);
// clk nil is the wall clock.
func NewLog(log *slog.Logger, l Limit, clk clock.Clock) *Log {
	if l.Rate <= 0 {
		l = DefaultLogLimit
	}
	if clk == nil {
		clk = clock.Real{}
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Log{log: log, limit: l, clock: clk, tokens: float64(max(l.Burst, 1))}
}

// Refused records one refusal. attrs name the remote address and the
// credential's ID or fingerprint, never a secret.
func (l *Log) Refused(ctx context.Context, msg string, attrs ...any) {
	now := l.clock.Now()
	l.mu.Lock()
	if !l.last.IsZero() {
		l.tokens = min(float64(max(l.limit.Burst, 1)), l.tokens+now.Sub(l.last).Seconds()*l.limit.Rate)
	}
	l.last = now
	if l.tokens < 1 {
		l.suppressed++
		l.mu.Unlock()
		return
	}
	l.tokens--
	suppressed := l.suppressed
	l.suppressed = 0
	l.mu.Unlock()
	if suppressed > 0 {
		attrs = append(attrs, "refusals_not_logged_before_this", suppressed)
	}
	l.log.WarnContext(ctx, msg, attrs...)
}
