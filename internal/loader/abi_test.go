package loader

import (
	"strings"
	"testing"

	"github.com/cilium/ebpf"
)

// TestMapABIMatchesELF holds mapABI, which the plugin checks pins against,
// to the embedded ELF: a map added or changed in C without the table fails
// here, not on a node.
func TestMapABIMatchesELF(t *testing.T) {
	spec, err := Spec()
	if err != nil {
		t.Fatal(err)
	}
	inELF := map[string]bool{}
	for name, ms := range spec.Maps {
		if strings.HasPrefix(name, ".") {
			continue
		}
		inELF[name] = true
		l, ok := mapABI[name]
		if !ok {
			t.Errorf("map %s is in the ELF but not in mapABI", name)
			continue
		}
		if l.typ != ms.Type {
			t.Errorf("map %s: mapABI says type %s, the ELF %s", name, l.typ, ms.Type)
		}
		if k := abiSize(l.key); k != ms.KeySize {
			t.Errorf("map %s: mapABI says key size %d, the ELF %d", name, k, ms.KeySize)
		}
		if v := abiSize(l.value); v != ms.ValueSize {
			t.Errorf("map %s: mapABI says value size %d, the ELF %d", name, v, ms.ValueSize)
		}
	}
	for name := range mapABI {
		if !inELF[name] {
			t.Errorf("map %s is in mapABI but not in the ELF", name)
		}
	}
	var names []string
	(&Objects{}).eachMap(func(name string, _ **ebpf.Map) { names = append(names, name) })
	for _, name := range names {
		if _, ok := mapABI[name]; !ok {
			t.Errorf("Objects opens map %s, which mapABI lacks", name)
		}
	}
	if len(names) != len(mapABI) {
		t.Errorf("Objects opens %d maps, mapABI has %d", len(names), len(mapABI))
	}
}

// The objects OpenForEndpoints opens exist, so a typo there would leave a
// map nil that the plugin then uses.
func TestForEndpointsNamesExist(t *testing.T) {
	names := map[string]bool{}
	dp := &Objects{}
	dp.eachMap(func(name string, _ **ebpf.Map) { names[name] = true })
	dp.eachProgram(func(name string, _ **ebpf.Program) { names[name] = true })
	for name := range forEndpoints {
		if !names[name] {
			t.Errorf("forEndpoints names %s, which the datapath does not have", name)
		}
	}
}
