package datapath

// ForceAttachmentHash makes every attachment hash to h (every endpoint on
// one probe chain) until the returned func restores the real hash.
func ForceAttachmentHash(h uint32) (restore func()) {
	orig := attachmentHash
	attachmentHash = func(string, string) uint32 { return h }
	return func() { attachmentHash = orig }
}
