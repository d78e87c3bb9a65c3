package main

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"time"
)

// certAuthority is a self-signed CA minted for one control-plane run.
type certAuthority struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
}

func newCA(cn string) (*certAuthority, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	tmpl := &x509.Certificate{
		SerialNumber:          randomSerial(),
		Subject:               pkix.Name{CommonName: cn},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(10 * 365 * 24 * time.Hour),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		return nil, err
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, err
	}
	return &certAuthority{cert: cert, key: key}, nil
}

// issue signs a leaf for a server (dnsNames/ips set) or a client (orgs set).
func (ca *certAuthority) issue(cn string, orgs []string, dnsNames []string, ips []net.IP) ([]byte, *ecdsa.PrivateKey, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, err
	}
	usage := x509.ExtKeyUsageClientAuth
	if len(dnsNames) > 0 || len(ips) > 0 {
		usage = x509.ExtKeyUsageServerAuth
	}
	tmpl := &x509.Certificate{
		SerialNumber: randomSerial(),
		Subject:      pkix.Name{CommonName: cn, Organization: orgs},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(5 * 365 * 24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{usage},
		DNSNames:     dnsNames,
		IPAddresses:  ips,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, key.Public(), ca.key)
	if err != nil {
		return nil, nil, err
	}
	return der, key, nil
}

func randomSerial() *big.Int {
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 126))
	if err != nil {
		panic(err) // crypto/rand never fails on Linux
	}
	return n.Add(n, big.NewInt(1))
}

func certPEM(der []byte) []byte {
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
}

func keyPEM(key any) ([]byte, error) {
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, err
	}
	return pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), nil
}

// pkiFiles are the paths of everything the components need.
type pkiFiles struct {
	dir                          string
	caCert                       string
	servingCert, servingKey      string
	frontProxyCA                 string
	proxyClientCert, proxyClient string
	saKey, saPub                 string
	// PEM for the admin and node kubeconfigs (kept in memory; written into them).
	caPEM, adminCertPEM, adminKeyPEM []byte
	nodeCertPEM, nodeKeyPEM          []byte
}

// writePKI mints the cluster CA, the API server serving certificate, an admin client
// certificate in system:masters, the node's system:node:<nodeName> client certificate
// (group system:nodes), the front-proxy (aggregation) pair and the service-account
// signing key into dir.
func writePKI(dir, nodeName string) (*pkiFiles, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	p := &pkiFiles{
		dir:             dir,
		caCert:          filepath.Join(dir, "ca.crt"),
		servingCert:     filepath.Join(dir, "apiserver.crt"),
		servingKey:      filepath.Join(dir, "apiserver.key"),
		frontProxyCA:    filepath.Join(dir, "front-proxy-ca.crt"),
		proxyClientCert: filepath.Join(dir, "front-proxy-client.crt"),
		proxyClient:     filepath.Join(dir, "front-proxy-client.key"),
		saKey:           filepath.Join(dir, "sa.key"),
		saPub:           filepath.Join(dir, "sa.pub"),
	}
	write := func(path string, data []byte) error { return os.WriteFile(path, data, 0o600) }

	ca, err := newCA("service-ca-operator-test-cluster-ca")
	if err != nil {
		return nil, err
	}
	p.caPEM = certPEM(ca.cert.Raw)
	if err := write(p.caCert, p.caPEM); err != nil {
		return nil, err
	}

	serving, servingKey, err := ca.issue("kube-apiserver", nil,
		[]string{"localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc", "kubernetes.default.svc.cluster.local"},
		[]net.IP{net.ParseIP("127.0.0.1"), net.ParseIP("10.96.0.1")})
	if err != nil {
		return nil, err
	}
	if err := writePair(p.servingCert, p.servingKey, serving, servingKey); err != nil {
		return nil, err
	}

	admin, adminKey, err := ca.issue("admin", []string{"system:masters"}, nil, nil)
	if err != nil {
		return nil, err
	}
	p.adminCertPEM = certPEM(admin)
	if p.adminKeyPEM, err = keyPEM(adminKey); err != nil {
		return nil, err
	}

	node, nodeKey, err := ca.issue("system:node:"+nodeName, []string{"system:nodes"}, nil, nil)
	if err != nil {
		return nil, err
	}
	p.nodeCertPEM = certPEM(node)
	if p.nodeKeyPEM, err = keyPEM(nodeKey); err != nil {
		return nil, err
	}

	fp, err := newCA("service-ca-operator-test-front-proxy-ca")
	if err != nil {
		return nil, err
	}
	if err := write(p.frontProxyCA, certPEM(fp.cert.Raw)); err != nil {
		return nil, err
	}
	proxy, proxyKey, err := fp.issue("front-proxy-client", nil, nil, nil)
	if err != nil {
		return nil, err
	}
	if err := writePair(p.proxyClientCert, p.proxyClient, proxy, proxyKey); err != nil {
		return nil, err
	}

	saKey, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		return nil, err
	}
	saKeyPEM, err := keyPEM(saKey)
	if err != nil {
		return nil, err
	}
	if err := write(p.saKey, saKeyPEM); err != nil {
		return nil, err
	}
	pubDER, err := x509.MarshalPKIXPublicKey(&saKey.PublicKey)
	if err != nil {
		return nil, err
	}
	if err := write(p.saPub, pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: pubDER})); err != nil {
		return nil, err
	}
	return p, nil
}

func writePair(certPath, keyPath string, der []byte, key *ecdsa.PrivateKey) error {
	k, err := keyPEM(key)
	if err != nil {
		return err
	}
	if err := os.WriteFile(certPath, certPEM(der), 0o600); err != nil {
		return err
	}
	if err := os.WriteFile(keyPath, k, 0o600); err != nil {
		return fmt.Errorf("write %s: %w", keyPath, err)
	}
	return nil
}
