#!/usr/bin/env bash
# The Element Call tests: the real app (@element-hq/element-call-embedded) in
# headless Chromium, embedded by our host page, against Synapse and Moselle.
# Installs the npm packages if needed (idempotent), bundles the host page and
# runs the test files inside a network namespace (tests/netns.sh):
#   call.test.mjs     two users, a third joins, one hangs up; both discovery paths
#   leave.test.mjs    a browser killed with SIGKILL: Moselle's delegated leave ends its membership
#   matrix2.test.mjs  matrix_2_0 mode (/get_token, hashed identities, sticky events)
#   failover.test.mjs two LU nodes on Redis, the one holding the call killed: the call comes back on the other
#   MOSELLE_BIN   the moselle binary (default target/debug/moselle)
#   EC_TESTS      which files (default: all four), e.g. EC_TESTS=leave
#   EC_KEEP_TMP=1 keep the Synapse and Moselle directories (in $TMPDIR) after the run
#   Logs of every run: tests/out/element-call-logs/; screenshots: tests/out/element-call-*.png
#   extra arguments go to `node --test` (e.g. --test-name-pattern=config)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
cd "$here"

if [[ ! -d node_modules/@element-hq/element-call-embedded ]] || [[ package-lock.json -nt node_modules/.package-lock.json ]]; then
    echo "=== npm ci (tests/element-call)"
    npm ci --no-audit --no-fund
fi

echo "=== bundle the host page"
mkdir -p build/pkg
node_modules/.bin/esbuild host.js --bundle --format=esm --platform=browser --target=chrome120 \
    --define:global=globalThis --log-level=warning --outfile=build/host.js
cp node_modules/@matrix-org/matrix-sdk-crypto-wasm/pkg/matrix_sdk_crypto_wasm_bg.wasm build/pkg/

cd "$root"
files=()
for t in ${EC_TESTS:-call leave matrix2 failover}; do files+=("tests/element-call/$t.test.mjs"); done
exec tests/netns.sh node --test --test-concurrency=1 "$@" "${files[@]}"
