// vcsim launcher for the tests: govmomi's vCenter simulator (simulator.VPX()) on a given
// loopback address, with fixed credentials and TLS. Debian ships the simulator library but
// no vcsim binary; build offline with:
//
//	GO111MODULE=off GOPATH=/usr/share/gocode go build -o vcsim .
package main

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"flag"
	"fmt"
	"log"
	"math/big"
	"net"
	"net/url"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/vmware/govmomi/simulator"
)

func main() {
	listen := flag.String("listen", "127.0.0.1:0", "address to serve the SDK and /nfc/ uploads on")
	username := flag.String("username", "user", "the only user name accepted by Login")
	password := flag.String("password", "pass", "the only password accepted by Login")
	certOut := flag.String("cert-out", "", "write the server's self-signed certificate (PEM) here")
	flag.Parse()

	model := simulator.VPX()
	if err := model.Create(); err != nil {
		log.Fatal(err)
	}
	defer model.Remove()

	model.Service.Listen = &url.URL{Host: *listen, User: url.UserPassword(*username, *password)}
	cert, der, err := selfSignedCert()
	if err != nil {
		log.Fatal(err)
	}
	model.Service.TLS = &tls.Config{Certificates: []tls.Certificate{cert}}
	model.Service.RegisterEndpoints = true
	server := model.Service.NewServer()
	defer server.Close()

	if *certOut != "" {
		block := &pem.Block{Type: "CERTIFICATE", Bytes: der}
		if err := os.WriteFile(*certOut, pem.EncodeToMemory(block), 0o644); err != nil {
			log.Fatal(err)
		}
	}
	// The fixture waits for this line: the server is listening once it is printed.
	fmt.Printf("ready https://%s/sdk\n", server.URL.Host)

	stop := make(chan os.Signal, 1)
	signal.Notify(stop, os.Interrupt, syscall.SIGTERM)
	<-stop
}

// selfSignedCert makes a P-256 certificate for localhost/127.0.0.1 that is its own CA: the
// Go test certificate vcsim uses by default has a 1024-bit key, which OpenSSL refuses.
func selfSignedCert() (tls.Certificate, []byte, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return tls.Certificate{}, nil, err
	}
	template := &x509.Certificate{
		SerialNumber:          big.NewInt(time.Now().UnixNano()),
		Subject:               pkix.Name{CommonName: "vcsim"},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(24 * time.Hour),
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		BasicConstraintsValid: true,
		IsCA:                  true,
		DNSNames:              []string{"localhost"},
		IPAddresses:           []net.IP{net.ParseIP("127.0.0.1")},
	}
	der, err := x509.CreateCertificate(rand.Reader, template, template, &key.PublicKey, key)
	if err != nil {
		return tls.Certificate{}, nil, err
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}, der, nil
}
