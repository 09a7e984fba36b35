package pki

// For the tests of the SPIFFE ID round trip, which the signer uses.
var (
	SPIFFEID         = (*Authority).spiffeID
	NodeIDFromSPIFFE = (*Authority).nodeIDFromSPIFFE
)
