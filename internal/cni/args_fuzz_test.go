package cni

import (
	"errors"
	"strings"
	"testing"
	"unicode"
	"unicode/utf8"

	"github.com/containernetworking/cni/pkg/types"
)

// podArgsShape is what types.LoadArgs decides about CNI_ARGS before
// parseCNIArgs looks at the values: ok is false when it refuses the string
// (a pair without exactly one '=', an IgnoreUnknown that is not a boolean, a
// key naming a non-text field, unknown keys after IgnoreUnknown=0). The last
// K8S_POD_NAME and K8S_POD_NAMESPACE win.
func podArgsShape(s string) (name, namespace, mac string, ok bool) {
	if s == "" {
		return "", "", "", true
	}
	ignoreUnknown, unknown := true, false // parseCNIArgs presets IgnoreUnknown
	for _, pair := range strings.Split(s, ";") {
		kv := strings.Split(pair, "=")
		if len(kv) != 2 {
			return "", "", "", false
		}
		switch kv[0] {
		case "K8S_POD_NAME":
			name = kv[1]
		case "K8S_POD_NAMESPACE":
			namespace = kv[1]
		case "MAC": // read, checked only where used (applyMACArg)
			mac = kv[1]
		case "IgnoreUnknown":
			switch strings.ToLower(kv[1]) {
			case "1", "true":
				ignoreUnknown = true
			case "0", "false":
				ignoreUnknown = false
			default:
				return "", "", "", false
			}
		case "CommonArgs":
			return "", "", "", false
		default:
			unknown = true
		}
	}
	return name, namespace, mac, !unknown || ignoreUnknown
}

// printableASCII is what Kubernetes names are made of.
func printableASCII(s string) bool {
	return !strings.ContainsFunc(s, func(r rune) bool { return r < 0x20 || r > 0x7e })
}

// broken values are refused: they would become metric labels and registry
// strings.
func broken(s string) bool {
	return !utf8.ValidString(s) || strings.ContainsFunc(s, unicode.IsControl)
}

// checkPodArgs runs parseCNIArgs on s and checks it against the model:
// refused shapes and broken values fail with a CNI error 4 naming CNI_ARGS,
// printable ASCII values come back exactly. Other printable Unicode may go
// either way, but never comes back altered.
func checkPodArgs(t *testing.T, s string) {
	t.Helper()
	a, err := parseCNIArgs(s)
	name, namespace := a.PodName, a.PodNamespace
	wantName, wantNamespace, wantMAC, shapeOK := podArgsShape(s)
	if err != nil {
		var te *types.Error
		if !errors.As(err, &te) || te.Code != types.ErrInvalidEnvironmentVariables || !strings.HasPrefix(te.Msg, "CNI_ARGS: ") {
			t.Fatalf("parseCNIArgs(%q): %v is not a CNI error 4 about CNI_ARGS", s, err)
		}
		if name != "" || namespace != "" {
			t.Fatalf("parseCNIArgs(%q) failed but returned %q, %q", s, name, namespace)
		}
		if shapeOK && printableASCII(wantName) && printableASCII(wantNamespace) {
			t.Fatalf("parseCNIArgs(%q) refused a well-formed CNI_ARGS: %v", s, err)
		}
		return
	}
	if !shapeOK {
		t.Fatalf("parseCNIArgs(%q) accepted what LoadArgs refuses: %q, %q", s, name, namespace)
	}
	if broken(name) || broken(namespace) {
		t.Fatalf("parseCNIArgs(%q) accepted control characters or invalid UTF-8: %q, %q", s, name, namespace)
	}
	if name != wantName || namespace != wantNamespace || a.MAC != wantMAC {
		t.Fatalf("parseCNIArgs(%q) = %q, %q, MAC %q; want %q, %q, MAC %q", s, name, namespace, a.MAC, wantName, wantNamespace, wantMAC)
	}
}

// FuzzParsePodArgs: any CNI_ARGS string is either refused with a CNI error
// or read as the model reads it; and a runtime-shaped CNI_ARGS built around
// a pod name and namespace gives them back exactly (or is refused, if they
// are broken).
func FuzzParsePodArgs(f *testing.F) {
	f.Add("IgnoreUnknown=1;K8S_POD_NAMESPACE=kube-system;K8S_POD_NAME=coredns-1;K8S_POD_INFRA_CONTAINER_ID=abc;K8S_POD_UID=u", "web-0", "shop")
	f.Add("", "", "")
	f.Add("K8S_POD_NAME", "a;b", "c=d")
	f.Add("K8S_POD_NAME=a=b;;", "a\x00b", "\xff")
	f.Add("IgnoreUnknown=0;FOO=bar", "café", "x\u0085")
	f.Add("=x;K8S_POD_NAME=a;K8S_POD_NAME=b", strings.Repeat("n", 300), "ns")
	f.Add("IgnoreUnknown=maybe;CommonArgs=x", "web-0", "")
	f.Add("IgnoreUnknown=0;MAC=02:00:00:00:00:01;K8S_POD_NAME=a;MAC=zz", "web-0", "shop")
	f.Fuzz(func(t *testing.T, raw, name, namespace string) {
		checkPodArgs(t, raw)
		if strings.ContainsAny(name+namespace, ";=") {
			return // not expressible in CNI_ARGS
		}
		// What containerd and CRI-O pass.
		s := "IgnoreUnknown=1;K8S_POD_NAMESPACE=" + namespace + ";K8S_POD_NAME=" + name + ";K8S_POD_INFRA_CONTAINER_ID=abc;K8S_POD_UID=u"
		checkPodArgs(t, s)
		if printableASCII(name) && printableASCII(namespace) {
			if a, err := parseCNIArgs(s); err != nil || a.PodName != name || a.PodNamespace != namespace {
				t.Fatalf("pod %q/%q came back as %q/%q, %v", namespace, name, a.PodNamespace, a.PodName, err)
			}
		}
	})
}

// TestParsePodArgsHostile: what a broken or hostile runtime could put in
// CNI_ARGS, and what the plugin makes of it. Refusals must say what is
// wrong; what is accepted comes back verbatim.
func TestParsePodArgsHostile(t *testing.T) {
	long := strings.Repeat("a", 64<<10)
	for _, tc := range []struct {
		name       string
		args       string
		errText    string // "" means accepted
		pod, podNS string
	}{
		{"no =", "K8S_POD_NAME", `invalid pair "K8S_POD_NAME"`, "", ""},
		{"= in the value", "K8S_POD_NAME=a=b", `invalid pair "K8S_POD_NAME=a=b"`, "", ""},
		{"trailing ;", "K8S_POD_NAME=web-0;", `invalid pair ""`, "", ""},
		{"empty pair", "K8S_POD_NAME=web-0;;K8S_POD_NAMESPACE=shop", `invalid pair ""`, "", ""},
		{"NUL in the name", "K8S_POD_NAME=web\x000", "K8S_POD_NAME", "", ""},
		{"newline in the namespace", "K8S_POD_NAMESPACE=shop\nx", "K8S_POD_NAMESPACE", "", ""},
		{"C1 control", "K8S_POD_NAME=web\u00850", "control characters", "", ""},
		{"invalid UTF-8", "K8S_POD_NAMESPACE=\xff\xfe", "invalid UTF-8", "", ""},
		{"IgnoreUnknown not a boolean", "IgnoreUnknown=maybe;K8S_POD_NAME=web-0", "maybe", "", ""},
		{"IgnoreUnknown=0 with other keys", "IgnoreUnknown=0;K8S_POD_NAME=web-0;K8S_POD_UID=u", "unknown args", "", ""},
		{"IgnoreUnknown=0 with a MAC: a known key", "IgnoreUnknown=0;K8S_POD_NAME=web-0;MAC=02:00:00:00:00:01", "", "web-0", ""},
		{"a key naming a struct", "CommonArgs=x", "CommonArgs", "", ""},
		// Accepted, as the code documents:
		{"empty", "", "", "", ""},
		{"empty key: an unknown key, ignored", "=x;K8S_POD_NAME=web-0", "", "web-0", ""},
		{"unknown keys ignored", "FOO=bar;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-0", "", "web-0", "shop"},
		{"keys are case-sensitive", "k8s_pod_name=web-0", "", "", ""},
		{"duplicate key: the last wins", "K8S_POD_NAME=old;K8S_POD_NAME=web-0", "", "web-0", ""},
		{"empty values", "K8S_POD_NAME=;K8S_POD_NAMESPACE=", "", "", ""},
		{"over-long value: kept, cut in the registry", "K8S_POD_NAME=" + long, "", long, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			a, err := parseCNIArgs(tc.args)
			pod, podNS := a.PodName, a.PodNamespace
			if tc.errText != "" {
				var te *types.Error
				if !errors.As(err, &te) || te.Code != types.ErrInvalidEnvironmentVariables {
					t.Fatalf("got %q, %q, %v; want a CNI error 4", pod, podNS, err)
				}
				if !strings.Contains(te.Msg, tc.errText) || !strings.HasPrefix(te.Msg, "CNI_ARGS: ") {
					t.Fatalf("error %q does not say %q", te.Msg, tc.errText)
				}
				return
			}
			if err != nil || pod != tc.pod || podNS != tc.podNS {
				t.Fatalf("got %q, %q, %v; want %q, %q", pod, podNS, err, tc.pod, tc.podNS)
			}
		})
	}
}
