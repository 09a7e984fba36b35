package pki

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/llorch/llorch/internal/atomicfile"
)

// TLS session tickets let an edge that reconnects after a control-plane
// restart resume its TLS session: no certificates are sent, parsed or
// verified and nothing is signed, which is most of a handshake's CPU and what
// bounds how fast a fleet comes back (docs/BENCHMARKS.md). A ticket holds the
// edge's certificate chain, encrypted under a ticket key; Go's crypto/tls
// checks on resumption that the leaf has not expired and that the chain still
// ends in a CA the port accepts (Authority.ClientCAs), and authorization
// checks the node and its certificate serial against the store on every
// request, resumed or not (removal and supersession apply at once).
//
// Whoever holds a ticket key can make a ticket for any node, as whoever holds
// the intermediate's key can sign a certificate for any node: so the keys
// live beside it, in the CA directory, mode 0600, and are replaced daily.
const (
	ticketKeysFile = "session-ticket.keys"
	// ticketKeyRotation is how often a new key starts encrypting tickets.
	ticketKeyRotation = 24 * time.Hour
	// ticketKeyKeep is how long a key decrypts tickets after it was made:
	// a ticket lives at most 7 days (crypto/tls), and a key encrypts them
	// for a day.
	ticketKeyKeep = 7*24*time.Hour + ticketKeyRotation
)

type ticketKey struct {
	created time.Time
	key     [32]byte
}

// TicketKeys returns the keys for the public port's TLS session tickets,
// newest first (tls.Config.SetSessionTicketKeys: the first encrypts, all
// decrypt). When the newest is a day old it makes and stores a new one, and
// it drops keys older than ticketKeyKeep. A key that cannot be stored is
// still used: losing it only costs edges a full handshake after a restart.
func (a *Authority) TicketKeys(ctx context.Context) [][32]byte {
	a.ticketMu.Lock()
	defer a.ticketMu.Unlock()
	now := a.cfg.Clock.Now()
	if len(a.tickets) == 0 || now.Sub(a.tickets[0].created) >= ticketKeyRotation {
		var k ticketKey
		k.created = now
		if _, err := rand.Read(k.key[:]); err != nil {
			panic(err) // crypto/rand never fails on Linux
		}
		a.tickets = append([]ticketKey{k}, a.tickets...)
		a.tickets = keepTicketKeys(a.tickets, now)
		if err := atomicfile.Write(filepath.Join(a.cfg.Dir, ticketKeysFile), encodeTicketKeys(a.tickets), 0o600); err != nil {
			a.cfg.Logger.ErrorContext(ctx, "cannot store the new session ticket key; edges will do full handshakes after the next restart", "err", err)
		}
	}
	keys := make([][32]byte, len(a.tickets))
	for i, k := range a.tickets {
		keys[i] = k.key
	}
	return keys
}

// loadTicketKeys reads the stored keys. A damaged file is not fatal: its
// keys are dropped with a warning and new ones made (tickets they encrypted
// fall back to full handshakes).
func (a *Authority) loadTicketKeys(ctx context.Context) {
	data, err := os.ReadFile(filepath.Join(a.cfg.Dir, ticketKeysFile))
	if errors.Is(err, fs.ErrNotExist) {
		return
	}
	if err == nil {
		a.tickets, err = parseTicketKeys(data)
	}
	if err != nil {
		a.tickets = nil
		a.cfg.Logger.WarnContext(ctx, "session ticket keys unreadable; making new ones (edges do one full handshake)", "file", filepath.Join(a.cfg.Dir, ticketKeysFile), "err", err)
		return
	}
	a.tickets = keepTicketKeys(a.tickets, a.cfg.Clock.Now())
}

// keepTicketKeys drops the keys past ticketKeyKeep (keys are newest first).
func keepTicketKeys(keys []ticketKey, now time.Time) []ticketKey {
	for i, k := range keys {
		if now.Sub(k.created) >= ticketKeyKeep {
			return keys[:i]
		}
	}
	return keys
}

// The file has one key per line, newest first: the Unix time it was made
// and the key in hex.
func encodeTicketKeys(keys []ticketKey) []byte {
	var b bytes.Buffer
	for _, k := range keys {
		fmt.Fprintf(&b, "%d %s\n", k.created.Unix(), hex.EncodeToString(k.key[:]))
	}
	return b.Bytes()
}

func parseTicketKeys(data []byte) ([]ticketKey, error) {
	var keys []ticketKey
	for i, line := range strings.Split(strings.TrimSpace(string(data)), "\n") {
		if line == "" {
			continue
		}
		created, keyHex, ok := strings.Cut(line, " ")
		secs, err := strconv.ParseInt(created, 10, 64)
		if !ok || err != nil {
			return nil, fmt.Errorf("line %d: want \"<unix time> <key in hex>\"", i+1)
		}
		var k ticketKey
		k.created = time.Unix(secs, 0)
		if len(keyHex) != hex.EncodedLen(len(k.key)) {
			return nil, fmt.Errorf("line %d: the key is not %d bytes of hex", i+1, len(k.key))
		}
		if _, err := hex.Decode(k.key[:], []byte(keyHex)); err != nil {
			return nil, fmt.Errorf("line %d: the key is not %d bytes of hex", i+1, len(k.key))
		}
		if len(keys) > 0 && k.created.After(keys[len(keys)-1].created) {
			return nil, fmt.Errorf("line %d: keys are not newest first", i+1)
		}
		keys = append(keys, k)
	}
	return keys, nil
}
