#!/usr/bin/env bash
# The churn soak for MINUTES (tests/python/test_soak.py; the test command
# runs it for 2): real LiveKit Python SDK participants join, publish, switch
# layers, resume, reconnect, leave or are killed in three rooms; then the
# gauges must be back at zero and the server's RSS, descriptors and threads
# back at their level after a warm-up round. Prints the summary line.
#   scripts/soak.sh MINUTES [SEED]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export SOAK_MINUTES="${1:?usage: scripts/soak.sh MINUTES [SEED]}"
[[ -n "${2:-}" ]] && export SOAK_SEED="$2"
[[ -x target/debug/moselle ]] || cargo build
exec tests/python/run.sh tests/python/test_soak.py -q -s -p no:cacheprovider
