#!/usr/bin/env bash
# Writes deploy/k8s/secret.yml (or the path given) with the two Secrets of
# secret.example.yml filled in: a random auth token, a random ClickHouse
# password, and a fresh private CA with an aggregator certificate for
# aperture-aggregator.aperture.svc.cluster.local (ECDSA P-256). Needs openssl.
#
#   bash deploy/k8s/gen-secret.sh            # -> deploy/k8s/secret.yml
#   bash deploy/k8s/gen-secret.sh out.yml    # elsewhere
#
# It never overwrites an existing file: rotating credentials is a decision.
set -euo pipefail
out="${1:-$(dirname "$0")/secret.yml}"
if [ -e "$out" ]; then
  echo "gen-secret: $out exists; remove it first to make new credentials" >&2
  exit 1
fi
command -v openssl >/dev/null || { echo "gen-secret: openssl is required" >&2; exit 1; }

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
umask 077

svc=aperture-aggregator
ns=aperture
openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$work/ca.key" 2>/dev/null
openssl req -x509 -new -key "$work/ca.key" -sha256 -days 3650 -subj "/CN=Aperture CA" \
  -addext "basicConstraints=critical,CA:TRUE,pathlen:0" \
  -addext "keyUsage=critical,keyCertSign,cRLSign" \
  -out "$work/ca.crt" 2>/dev/null
openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$work/tls.key" 2>/dev/null
openssl req -new -key "$work/tls.key" -subj "/CN=$svc.$ns.svc.cluster.local" -out "$work/tls.csr" 2>/dev/null
cat > "$work/ext.cnf" <<EXT
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=serverAuth
subjectAltName=DNS:$svc.$ns.svc.cluster.local,DNS:$svc.$ns.svc,DNS:$svc.$ns,DNS:$svc
EXT
openssl x509 -req -in "$work/tls.csr" -CA "$work/ca.crt" -CAkey "$work/ca.key" -CAcreateserial \
  -days 825 -sha256 -extfile "$work/ext.cnf" -out "$work/tls.crt" 2>/dev/null

indent() { sed 's/^/    /' "$1"; }
{
  cat <<YAML
# Made by deploy/k8s/gen-secret.sh on $(date -u +%Y-%m-%dT%H:%M:%SZ). Holds credentials: keep it out of git.
apiVersion: v1
kind: Secret
metadata:
  name: aperture
  namespace: $ns
  labels:
    app.kubernetes.io/part-of: aperture
type: Opaque
stringData:
  auth-token: $(openssl rand -hex 32)
  clickhouse-password: $(openssl rand -hex 24)
---
apiVersion: v1
kind: Secret
metadata:
  name: aperture-tls
  namespace: $ns
  labels:
    app.kubernetes.io/part-of: aperture
type: kubernetes.io/tls
stringData:
  ca.crt: |
YAML
  indent "$work/ca.crt"
  echo "  tls.crt: |"
  indent "$work/tls.crt"
  echo "  tls.key: |"
  indent "$work/tls.key"
} > "$out"
echo "gen-secret: wrote $out (CA valid 10 years, certificate 825 days)"
