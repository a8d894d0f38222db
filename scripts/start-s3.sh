#!/usr/bin/env bash
# Start a real S3-compatible server on loopback for the remote-cache tests: moto's server mode
# (PyPI `moto[server]`; no S3 server is packaged in Debian), installed into a virtual environment
# outside the repository, listening on 127.0.0.1 only.
#
# Idempotent: the venv is reused, a server already answering is left running. Returns once the
# server answers. The tests (`tests/it/remote_cache.rs`) find it at MMRUN_TEST_S3_ENDPOINT
# (default http://127.0.0.1:5123), skip with a notice when nothing answers there and fail instead
# under MMRUN_REQUIRE_S3=1.
#
# Environment (optional):
#   MMRUN_S3_VENV   the virtual environment (default: /opt/mmrun-moto)
#   MMRUN_S3_PORT   the port (default: 5123)
set -euo pipefail

venv="${MMRUN_S3_VENV:-/opt/mmrun-moto}"
port="${MMRUN_S3_PORT:-5123}"
url="http://127.0.0.1:${port}"

answers() { curl -s -o /dev/null --max-time 2 "$url/" 2>/dev/null; }

if answers; then
    echo "s3 (moto) is up at $url"
    exit 0
fi
if [[ ! -x "$venv/bin/moto_server" ]]; then
    echo "== installing moto[server] into $venv (pip)"
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q 'moto[server]'
fi
echo "== starting moto_server on 127.0.0.1:$port"
nohup "$venv/bin/moto_server" -H 127.0.0.1 -p "$port" >"${TMPDIR:-/tmp}/mmrun-moto.log" 2>&1 &
for _ in $(seq 100); do answers && break; sleep 0.1; done
if ! answers; then
    echo "start-s3.sh: moto_server did not answer on $url; see ${TMPDIR:-/tmp}/mmrun-moto.log" >&2
    exit 1
fi
echo "s3 (moto) is up at $url"
