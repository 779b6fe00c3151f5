#!/usr/bin/env bash
# Makes a throw-away certificate authority and the certificates a dev or test setup needs:
#
#   ca.pem ca.key            the dev CA (trust it with `tls.ca_file`, mosquitto's `cafile`)
#   server.pem server.key    a broker certificate for localhost, 127.0.0.1 and ::1
#   client.pem client.key    a client certificate for mutual TLS (`tls.cert_file`, `tls.key_file`)
#
# Usage: certs/make-dev-certs.sh [OUT_DIR]   (default: certs/dev next to this script, gitignored)
#
# Every key is made fresh on this machine; none of them belongs to any real system, and none is
# committed. Keys are ECDSA P-256 in PKCS#8 PEM, which rustls and mosquitto both read.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="${1:-$here/dev}"
days="${DEV_CERT_DAYS:-825}"
command -v openssl >/dev/null || { echo "make-dev-certs: openssl is required (apt-get install openssl)" >&2; exit 1; }
mkdir -p "$out"
cd "$out"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; chmod 600 "$1"; }
serial() { echo "0x$(openssl rand -hex 16)"; }

# The CA: may sign certificates, nothing else. A random tag in its name keeps two dev CAs apart
# (verifiers find the issuer by name: equal names would fail as a bad signature, not an unknown CA).
key ca.key
openssl req -x509 -new -key ca.key -sha256 -days "$days" -subj "/CN=mqbridge dev CA $(openssl rand -hex 4)" \
  -addext "basicConstraints=critical,CA:TRUE" \
  -addext "keyUsage=critical,keyCertSign,cRLSign" \
  -addext "subjectKeyIdentifier=hash" \
  -out ca.pem

# sign NAME CN EXTENSIONS: NAME.key and NAME.pem signed by the CA.
sign() {
  local name="$1" cn="$2" ext="$3"
  key "$name.key"
  openssl req -new -key "$name.key" -subj "/CN=$cn" -out "$work/$name.csr"
  printf '%s\n' "$ext" >"$work/$name.ext"
  openssl x509 -req -in "$work/$name.csr" -CA ca.pem -CAkey ca.key -set_serial "$(serial)" \
    -sha256 -days "$days" -extfile "$work/$name.ext" -out "$name.pem" 2>/dev/null
}

# Certificate verifiers (rustls/webpki) read only the SAN, never the CN: both names and IPs here.
sign server localhost "basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=DNS:localhost,IP:127.0.0.1,IP:::1
authorityKeyIdentifier=keyid"

sign client mqbridge-dev-client "basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=clientAuth
authorityKeyIdentifier=keyid"

openssl verify -CAfile ca.pem server.pem client.pem >/dev/null
echo "dev CA and certificates in $out: ca.pem server.pem server.key client.pem client.key"
