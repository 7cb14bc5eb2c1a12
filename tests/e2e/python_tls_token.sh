#!/usr/bin/env bash
# End-to-end: the Python client library (client/python/gradserve/client.py) against the real
# gradserve binary with mutual TLS and a bearer token, using certificates made here with openssl.
# The checks themselves are in python_tls_token.py.
#
#   tests/e2e/python_tls_token.sh SERVER_BINARY SOURCE_DIR
#
# Passes only if every check passes AND the server exits 0 on SIGTERM.
set -euo pipefail

if [[ $# -ne 2 ]]; then
  echo "usage: $0 SERVER_BINARY SOURCE_DIR" >&2
  exit 2
fi
server_bin="$1"
source_dir="$(cd "$2" && pwd)"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=tests/e2e/server_lib.sh
source "${here}/server_lib.sh"
# The Python packages (grpcio, protobuf, numpy) are installed for the system interpreter only.
python="${GRADSERVE_PYTHON:-/usr/bin/python3}"
work="$(mktemp -d -t gradserve-tls-XXXXXX)"
trap '_server_cleanup; rm -rf "${work}"' EXIT

# A throwaway PKI, as in tests/service/security_test.cc: a CA, a server certificate naming
# 127.0.0.1 and localhost (gRPC checks the subject alternative names, not the CN), a client
# certificate, and a second CA with a client certificate the server must not trust.
cat >"${work}/openssl.cnf" <<'EOF'
[req]
distinguished_name = dn
prompt = no
[dn]
CN = unused
[ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
[server]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = IP:127.0.0.1, DNS:localhost
[client]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = clientAuth
EOF
serial=1
run_openssl() {
  if ! (cd "${work}" && openssl "$@" >openssl.log 2>&1); then
    echo "openssl $* failed:" >&2
    cat "${work}/openssl.log" >&2
    return 1
  fi
}
make_ca() {  # make_ca NAME: self-signed NAME.pem / NAME.key
  run_openssl req -x509 -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
    -config openssl.cnf -extensions ca -subj "/CN=gradserve e2e $1" -keyout "$1.key" -out "$1.pem"
}
make_leaf() {  # make_leaf NAME CA SECTION: NAME.pem / NAME.key signed by CA
  serial=$((serial + 1))
  run_openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -config openssl.cnf \
    -subj "/CN=$1" -keyout "$1.key" -out "$1.csr"
  run_openssl x509 -req -in "$1.csr" -CA "$2.pem" -CAkey "$2.key" -set_serial "${serial}" \
    -days 2 -extfile openssl.cnf -extensions "$3" -out "$1.pem"
}
make_ca ca
make_ca other-ca
make_leaf server ca server
make_leaf client ca client
make_leaf other-client other-ca client
# A fresh random token per run, with the trailing newline the server (and the client) ignore.
openssl rand -hex 24 >"${work}/token"

# Stubs generated into the temporary directory from the current .proto, so that stale stubs in
# client/python (untracked, from an older generate.sh run) can never be what is tested.
"${source_dir}/client/python/generate.sh" "${work}/stubs" >/dev/null

# The server must not pick a token up from this environment: the file is the only source.
unset GRADSERVE_AUTH_TOKEN
start_server "${server_bin}" --threads 1 --tls-cert "${work}/server.pem" \
  --tls-key "${work}/server.key" --tls-client-ca "${work}/ca.pem" \
  --auth-token-file "${work}/token"

check_rc=0
"${python}" "${here}/python_tls_token.py" --target "127.0.0.1:${port}" --pki "${work}" \
  --stubs "${work}/stubs" --client-dir "${source_dir}/client/python" || check_rc=$?
server_rc=0
stop_server || server_rc=$?
echo "python TLS/token checks: exit ${check_rc}; server after SIGTERM: exit ${server_rc}"
[[ ${check_rc} -eq 0 && ${server_rc} -eq 0 ]]
