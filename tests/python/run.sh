#!/usr/bin/env bash
# Run the LiveKit-SDK conformance tests inside a fresh network namespace (tests/netns.sh):
# libwebrtc would otherwise also gather candidates on eth0. Needs root.
#   tests/python/run.sh [pytest args...]        e.g. tests/python/run.sh -k four_party -x
# Env: MOSELLE_BIN (server binary, default target/debug/moselle), PYTHON_VENV (default .venv).
# Exit code: pytest's.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
venv="${PYTHON_VENV:-$repo/.venv}"
pytest_bin="$venv/bin/pytest"
if [[ ! -x "$pytest_bin" ]]; then
    echo "run.sh: $pytest_bin not found; create it with:" >&2
    echo "  python3 -m venv $venv && $venv/bin/pip install -r $here/requirements.txt" >&2
    exit 2
fi
export MOSELLE_BIN="${MOSELLE_BIN:-$repo/target/debug/moselle}"
export PYTHONDONTWRITEBYTECODE=1

# Default to this directory unless a test path (file, dir or file::test) was given.
target=("$here")
for a in "$@"; do
    if [[ "$a" != -* && -e "${a%%::*}" ]] || [[ "$a" != -* && -e "$repo/${a%%::*}" ]]; then
        target=()
        break
    fi
done

cd "$repo"
exec "$here/../netns.sh" "$pytest_bin" "${target[@]}" "$@"
