// Command tlsclient is the Go crypto/tls client of the interoperability tests: it
// handshakes with a server, trusting only the given CA bundle, and checks the server
// name. Exit status 0 means the chain verified; otherwise the reason is on stderr.
//
//	tlsclient -addr 127.0.0.1:PORT -ca bundle.pem -name svc.ns.svc
//	tlsclient -verify -ca bundle.pem -name svc.ns.svc chain.pem   (no network)
//	tlsclient -serve -cert chain.pem -key key.pem   (a crypto/tls server on 127.0.0.1;
//	                                                  prints its port, serves until killed)
package main

import (
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"flag"
	"fmt"
	"net"
	"os"
	"time"
)

func main() {
	addr := flag.String("addr", "", "host:port to connect to")
	caFile := flag.String("ca", "", "PEM bundle of trusted CAs")
	name := flag.String("name", "", "server name to verify")
	verifyOnly := flag.Bool("verify", false, "verify the chain in the file argument instead of connecting")
	serve := flag.Bool("serve", false, "serve TLS with -cert and -key (loaded with tls.LoadX509KeyPair)")
	certFile := flag.String("cert", "", "PEM chain to serve, leaf first")
	keyFile := flag.String("key", "", "PEM private key to serve")
	flag.Parse()
	if *serve {
		if err := serveTLS(*certFile, *keyFile); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		return
	}
	if err := run(*addr, *caFile, *name, *verifyOnly, flag.Args()); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}

func run(addr, caFile, name string, verifyOnly bool, args []string) error {
	caPEM, err := os.ReadFile(caFile)
	if err != nil {
		return err
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(caPEM) {
		return errors.New("no certificate in the CA bundle")
	}
	if verifyOnly {
		if len(args) != 1 {
			return errors.New("-verify needs the chain file as its argument")
		}
		return verifyFile(args[0], roots, name)
	}
	conn, err := tls.DialWithDialer(&net.Dialer{Timeout: 5 * time.Second}, "tcp", addr, &tls.Config{RootCAs: roots, ServerName: name, MinVersion: tls.VersionTLS12})
	if err != nil {
		return err
	}
	return conn.Close()
}

func verifyFile(path string, roots *x509.CertPool, name string) error {
	data, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	var certs []*x509.Certificate
	for block, rest := pem.Decode(data); block != nil; block, rest = pem.Decode(rest) {
		c, err := x509.ParseCertificate(block.Bytes)
		if err != nil {
			return err
		}
		certs = append(certs, c)
	}
	if len(certs) == 0 {
		return errors.New("no certificate in the chain file")
	}
	inter := x509.NewCertPool()
	for _, c := range certs[1:] {
		inter.AddCert(c)
	}
	_, err = certs[0].Verify(x509.VerifyOptions{DNSName: name, Roots: roots, Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}})
	return err
}

// serveTLS loads the pair as any Go server does (PKCS#1, PKCS#8 or SEC1 keys), prints
// the port it listens on, and completes a handshake with every client until killed.
func serveTLS(certFile, keyFile string) error {
	pair, err := tls.LoadX509KeyPair(certFile, keyFile)
	if err != nil {
		return err
	}
	ln, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{Certificates: []tls.Certificate{pair}})
	if err != nil {
		return err
	}
	fmt.Println(ln.Addr().(*net.TCPAddr).Port)
	for {
		conn, err := ln.Accept()
		if err != nil {
			return err
		}
		go func(c net.Conn) {
			defer c.Close()
			_ = c.SetDeadline(time.Now().Add(10 * time.Second))
			if err := c.(*tls.Conn).Handshake(); err == nil {
				_, _ = c.Write([]byte("ok\n"))
			}
		}(conn)
	}
}
