#!/usr/bin/env bash
# Throw-away CA and certificates for local testing (not for production):
#   ca.pem; leader.pem + leader.key (CN=leader); learner.pem + learner.key (CN=learner).
# Valid for localhost, 127.0.0.1, ::1 and this host's name; add more names as the second argument,
# e.g. certs.sh certs DNS:leader.example.com,IP:10.0.0.5
set -euo pipefail
dir=${1:-certs}
extra=${2:-}
mkdir -p "$dir"
cd "$dir"
sans="DNS:localhost,IP:127.0.0.1,IP:::1,DNS:$(hostname)${extra:+,$extra}"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout ca.key -out ca.pem -days 30 \
  -subj "/CN=federated-learning-test-ca" -addext "basicConstraints=critical,CA:TRUE" \
  -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
for name in leader learner; do
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout "$name.key" -out "$name.csr" \
    -subj "/CN=$name" 2>/dev/null
  openssl x509 -req -in "$name.csr" -CA ca.pem -CAkey ca.key -CAcreateserial -out "$name.pem" -days 30 \
    -extfile <(printf 'subjectAltName=%s\nextendedKeyUsage=serverAuth,clientAuth\n' "$sans") 2>/dev/null
  rm "$name.csr"
done
chmod 600 ./*.key
echo "wrote $dir/ca.pem, $dir/leader.{pem,key} and $dir/learner.{pem,key} for $sans"
