//go:build linux

package kapi

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/pem"
	"math/big"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"time"
)

// pki holds the files of a throw-away CA, the apiserver's serving cert and
// the service-account token signing key, all ECDSA P-256 (fast to make).
type pki struct {
	caPEM                         []byte
	caFile, caKeyFile             string
	serverCertFile, serverKeyFile string
	saKeyFile, saPubFile          string
}

// writePKI writes them into dir; the serving certificate also names extra
// (when valid).
func writePKI(dir string, extra netip.Addr) (*pki, error) {
	p := &pki{
		caFile:         filepath.Join(dir, "ca.crt"),
		caKeyFile:      filepath.Join(dir, "ca.key"),
		serverCertFile: filepath.Join(dir, "apiserver.crt"),
		serverKeyFile:  filepath.Join(dir, "apiserver.key"),
		saKeyFile:      filepath.Join(dir, "sa.key"),
		saPubFile:      filepath.Join(dir, "sa.pub"),
	}
	caKey, caDER, err := newCert(&x509.Certificate{
		Subject:               pkix.Name{CommonName: "underpass-test-ca"},
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}, nil, nil)
	if err != nil {
		return nil, err
	}
	ca, err := x509.ParseCertificate(caDER)
	if err != nil {
		return nil, err
	}
	p.caPEM = pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: caDER})

	srv := &x509.Certificate{
		Subject:     pkix.Name{CommonName: "kube-apiserver"},
		KeyUsage:    x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		DNSNames: []string{"localhost", "kubernetes", "kubernetes.default",
			"kubernetes.default.svc", "kubernetes.default.svc.cluster.local"},
		IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1), net.IPv6loopback,
			net.IPv4(10, 96, 0, 1), net.ParseIP("fd00:96::1")},
	}
	if extra.IsValid() {
		srv.IPAddresses = append(srv.IPAddresses, extra.AsSlice())
	}
	srvKey, srvDER, err := newCert(srv, ca, caKey)
	if err != nil {
		return nil, err
	}

	saKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	saPub, err := x509.MarshalPKIXPublicKey(&saKey.PublicKey)
	if err != nil {
		return nil, err
	}

	err = writePEM([]pemFile{
		{p.caFile, "CERTIFICATE", caDER, nil},
		{p.caKeyFile, "", nil, caKey},
		{p.serverCertFile, "CERTIFICATE", srvDER, nil},
		{p.serverKeyFile, "", nil, srvKey},
		{p.saKeyFile, "", nil, saKey},
		{p.saPubFile, "PUBLIC KEY", saPub, nil},
	})
	if err != nil {
		return nil, err
	}
	return p, nil
}

// newCert makes a key and, from tmpl, its certificate (a random serial,
// valid from an hour ago for a day) signed with parentKey as parent, or
// self-signed when parent is nil.
func newCert(tmpl, parent *x509.Certificate, parentKey *ecdsa.PrivateKey) (*ecdsa.PrivateKey, []byte, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, err
	}
	now := time.Now()
	tmpl.SerialNumber, tmpl.NotBefore, tmpl.NotAfter = serial(), now.Add(-time.Hour), now.Add(24*time.Hour)
	if parent == nil {
		parent, parentKey = tmpl, key
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, &key.PublicKey, parentKey)
	if err != nil {
		return nil, nil, err
	}
	return key, der, nil
}

// pemFile is one PEM file: der of PEM type typ, or a private key (PKCS #8).
type pemFile struct {
	path string
	typ  string
	der  []byte
	key  any
}

func writePEM(files []pemFile) error {
	for _, f := range files {
		if f.key != nil {
			der, err := x509.MarshalPKCS8PrivateKey(f.key)
			if err != nil {
				return err
			}
			f.typ, f.der = "PRIVATE KEY", der
		}
		if err := os.WriteFile(f.path, pem.EncodeToMemory(&pem.Block{Type: f.typ, Bytes: f.der}), 0o600); err != nil {
			return err
		}
	}
	return nil
}

func serial() *big.Int {
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 120))
	if err != nil {
		panic(err)
	}
	return n
}

func randomToken() string {
	b := make([]byte, 24)
	if _, err := rand.Read(b); err != nil {
		panic(err)
	}
	return hex.EncodeToString(b)
}
