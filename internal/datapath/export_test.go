package datapath

import "github.com/underpass-cni/underpass/internal/loader"

// ForceAttachmentHash makes every attachment hash to h (every endpoint on
// one probe chain) until the returned func restores the real hash.
func ForceAttachmentHash(h uint32) (restore func()) {
	orig := attachmentHash
	attachmentHash = func(string, string) uint32 { return h }
	return func() { attachmentHash = orig }
}

// RecordPrefilterWrites calls record with every value written to a
// prefilter entry (after the write) until the returned func restores the
// plain write.
func RecordPrefilterWrites(record func(which uint32, v loader.Prefilter)) (restore func()) {
	orig := prefilterUpdate
	prefilterUpdate = func(m *loader.Maps, which uint32, v *loader.Prefilter) error {
		err := orig(m, which, v)
		if err == nil {
			record(which, *v)
		}
		return err
	}
	return func() { prefilterUpdate = orig }
}

// The C string helpers, for the fuzz tests of the encoding.
var (
	CString  = cString
	GoString = goString
)

// EvictStaleOwners is evictStaleOwners, for the rules on whose address
// wins.
var EvictStaleOwners = evictStaleOwners

// EvictAdopted is evictAdopted, for when a registration takes an adopted
// interface's MAC.
var EvictAdopted = evictAdopted
