package client_test

import (
	"crypto/tls"
	"crypto/x509"
	"io"
	"net"
	"net/http/httptest"
	"testing"

	"golang.org/x/net/http2"

	"github.com/llorch/llorch/edge/client"
	"github.com/llorch/llorch/edge/state"
)

// The edge's connections use no HPACK dynamic table: its SETTINGS offer a
// 1-byte table for the control plane's encoder, and its own first header
// block shrinks the table it encodes with to 1 byte (RFC 7541 6.3), so the
// control plane keeps no header table per connected node.
func TestNoHeaderCompressionTables(t *testing.T) {
	cert := httptest.NewTLSServer(nil) // only for its certificate, valid for 127.0.0.1
	cert.Close()
	ln, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{Certificates: cert.TLS.Certificates, NextProtos: []string{"h2"}})
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()

	type seen struct {
		tableSetting   uint32
		hasSetting     bool
		firstBlockByte byte
		err            error
	}
	got := make(chan seen, 1)
	go func() {
		var s seen
		defer func() { got <- s }()
		c, err := ln.Accept()
		if err != nil {
			s.err = err
			return
		}
		defer c.Close()
		preface := make([]byte, len(http2.ClientPreface))
		if _, err := io.ReadFull(c, preface); err != nil {
			s.err = err
			return
		}
		fr := http2.NewFramer(c, c)
		if err := fr.WriteSettings(); err != nil {
			s.err = err
			return
		}
		for {
			f, err := fr.ReadFrame()
			if err != nil {
				s.err = err
				return
			}
			switch f := f.(type) {
			case *http2.SettingsFrame:
				if !f.IsAck() {
					s.tableSetting, s.hasSetting = f.Value(http2.SettingHeaderTableSize)
					_ = fr.WriteSettingsAck()
				}
			case *http2.HeadersFrame:
				if b := f.HeaderBlockFragment(); len(b) > 0 {
					s.firstBlockByte = b[0]
				}
				return
			}
		}
	}()

	id := state.Identity{Roots: []*x509.Certificate{cert.Certificate()}}
	hc := client.HTTPClient(client.NewIdentity(id))
	resp, err := hc.Get("https://" + ln.Addr().(*net.TCPAddr).String() + "/")
	if err == nil {
		resp.Body.Close()
	}
	s := <-got
	if s.err != nil {
		t.Fatalf("reading the edge's frames: %v", s.err)
	}
	if !s.hasSetting || s.tableSetting != 1 {
		t.Errorf("SETTINGS_HEADER_TABLE_SIZE: present %v, value %d; want 1", s.hasSetting, s.tableSetting)
	}
	// 001xxxxx is a dynamic table size update; 0x21 sets the size to 1.
	if s.firstBlockByte != 0x21 {
		t.Errorf("first header block starts with %#x, want 0x21 (table size update to 1)", s.firstBlockByte)
	}
}
