#!/usr/bin/env bash
# The Debian package end to end: build it with cargo-deb from the binary the
# test command already built (target/debug), check its contents, install it
# with dpkg, verify the installed unit, run the INSTALLED binary with the
# INSTALLED config as the unit would (its ExecStart, user, environment and
# open-file limit; systemd is not PID 1 here) in a network namespace, hold a
# call through it with the LiveKit Python SDK (tokens signed with the keys
# file's secret), hold its system calls against the unit's sandbox, serve the
# call page's installed assets, then purge the package and check it is gone.
# Needs root. Env: PYTHON_VENV (default .venv), CARGO_TARGET_DIR, PACKAGE_KEEP=1
# keeps the work directory (server logs, strace output) in /tmp.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
cd "$repo"

CARGO_DEB_VERSION=3.8.0
venv="${PYTHON_VENV:-$repo/.venv}"
unit=/usr/lib/systemd/system/moselle.service
conf=/etc/moselle/moselle.toml
assets=/usr/share/moselle/call-page
ip=198.18.0.1 # tests/netns.sh's address

export PACKAGE_T0=${PACKAGE_T0:-$(date +%s)}
say() { printf '[package %3ds] %s\n' "$(($(date +%s) - PACKAGE_T0))" "$*"; }
fail() { echo "tests/package: FAIL: $*" >&2; exit 1; }

unit_value() { sed -n "s/^$1=//p" "$unit" | tail -n 1; }

wait_healthy() { # url, pid
    for _ in $(seq 100); do
        curl -fsS -o /dev/null "$1/healthz" 2>/dev/null && return 0
        kill -0 "$2" 2>/dev/null || return 1
        sleep 0.2
    done
    return 1
}

# Run a command as the unit does: its User=, no capabilities, no new
# privileges, its Environment= and LimitNOFILE=, a clean environment.
as_unit() {
    local user env=() nofile
    user=$(unit_value User)
    nofile=$(unit_value LimitNOFILE)
    # Raising the hard limit needs CAP_SYS_RESOURCE, which containers may lack.
    (($(ulimit -Hn) < nofile)) && nofile=$(ulimit -Hn)
    while IFS= read -r e; do env+=("$e"); done < <(sed -n 's/^Environment=//p' "$unit")
    env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin "${env[@]}" \
        prlimit --nofile="$nofile:$nofile" \
        setpriv --reuid="$user" --regid="$user" --init-groups --nnp \
        --bounding-set=-all --inh-caps=-all -- "$@"
}

# --- inside tests/netns.sh: serve a call with the installed package ----------
if [[ "${1:-}" == --in-netns ]]; then
    work=$2 key=$3 secret=$4
    url="http://$ip:7880"
    read -r -a exec_start <<<"$(unit_value ExecStart)"
    say "start, as the unit's user under strace: ${exec_start[*]}"
    # The default ports are free in this fresh namespace: the line runs as is.
    install -d -o "$(unit_value User)" "$work/trace.d"
    as_unit strace -f -qq -s 256 -o "$work/trace.d/trace" "${exec_start[@]}" >"$work/server.log" 2>&1 &
    tracer=$!
    server_log() { echo "--- server log:" >&2; tail -n 40 "$work/server.log" >&2; }
    wait_healthy "$url" "$tracer" || { server_log; fail "the installed server did not become healthy"; }
    main_pid=$(pgrep -u "$(unit_value User)" -x moselle) || fail "no moselle process under strace"
    say "healthy (pid $main_pid, user $(ps -o user= -p "$main_pid"))"

    code=$(curl -s -o /dev/null -w '%{http_code}' "$url/call/")
    [[ $code == 404 ]] || fail "/call/ answered $code: the shipped config must keep the call page off"

    "$venv/bin/python" "$here/call.py" "ws://$ip:7880" "$key" "$secret" \
        || { server_log; fail "no call through the installed server"; }
    say "call held"

    # ExecReload: kill -HUP $MAINPID. No TLS is configured: the node must live on.
    reload=$(unit_value ExecReload)
    eval "${reload//\$MAINPID/$main_pid}"
    sleep 0.5
    curl -fsS -o /dev/null "$url/healthz" || { server_log; fail "ExecReload ($reload) ended the server"; }
    grep -q SIGHUP "$work/server.log" || { server_log; fail "the server did not log the SIGHUP"; }
    ! grep -q $'\e' "$work/server.log" || fail "ANSI colours in the log despite the unit's NO_COLOR"

    kill -TERM "$main_pid"
    for _ in $(seq 150); do kill -0 "$tracer" 2>/dev/null || break; sleep 0.2; done
    kill -0 "$tracer" 2>/dev/null && { server_log; fail "the server did not stop within 30 s of SIGTERM"; }
    wait "$tracer" || { server_log; fail "the server exited with status $? after SIGTERM"; }
    say "reloaded (SIGHUP) and stopped (SIGTERM)"
    python3 "$here/check_trace.py" "$unit" "$work/trace.d/trace"

    # The call page, turned on in a copy of the installed config.
    sed '/^\[call_page\]/,/^\[/ s/^enabled = false/enabled = true/' "$conf" >"$work/call-page.toml"
    grep -q '^enabled = true' "$work/call-page.toml" || fail "could not turn the call page on in a copy of $conf"
    as_unit /usr/bin/moselle serve --config "$work/call-page.toml" >"$work/call-page.log" 2>&1 &
    page=$!
    wait_healthy "$url" "$page" || { tail "$work/call-page.log" >&2; fail "server with the call page on did not start"; }
    for f in livekit-client.umd.js livekit-client.e2ee.worker.js; do
        curl -fsS "$url/call/$f" -o "$work/$f" || fail "/call/$f not served"
        cmp -s "$work/$f" "$assets/$f" || fail "/call/$f is not the installed $assets/$f"
    done
    curl -fsS "$url/call/" | grep -q '<html' || fail "/call/ is no page"
    kill -TERM "$page"
    wait "$page" || true
    say "call page served from $assets"
    exit 0
fi

# --- cargo-deb -----------------------------------------------------------------
if [[ "$(cargo deb --version 2>/dev/null)" != "cargo-deb $CARGO_DEB_VERSION" ]]; then
    say "cargo install cargo-deb $CARGO_DEB_VERSION"
    cargo install cargo-deb --version "$CARGO_DEB_VERSION" --locked --quiet
fi

work=$(mktemp -d /tmp/moselle-package.XXXXXX)
chmod 0755 "$work"
cleanup() {
    if dpkg-query -W -f '${Status}' moselle 2>/dev/null | grep -q installed; then
        dpkg --purge moselle >/dev/null || true
    fi
    [[ -n ${PACKAGE_KEEP:-} ]] || rm -rf "$work"
}
trap cleanup EXIT

# --- build -------------------------------------------------------------------
# The binary the test command built (`cargo build`): packaging it saves a
# release build here (cargo-deb 3.8 warns that the dev profile is meant for
# releases only; --quiet drops that warning). Users build the release
# package with plain `cargo deb`. cargo-deb strips a copy (46 MB), not the
# test command's binary.
say "cargo deb --profile dev --no-build --no-dbgsym"
cargo deb --profile dev --no-build --no-dbgsym --fast --output "$work/" --quiet >/dev/null
deb=$(ls "$work"/moselle_*.deb)
say "built $(basename "$deb") ($(du -h "$deb" | cut -f1))"

contents=$(dpkg-deb -c "$deb" | awk '{print $6}' | sed 's|^\./|/|')
for f in /usr/bin/moselle "$conf" "$unit" "$assets/livekit-client.umd.js" \
    "$assets/livekit-client.e2ee.worker.js" /usr/share/doc/moselle/README.md \
    /usr/share/doc/moselle/copyright; do
    grep -qx "$f" <<<"$contents" || fail "$f is not in the package; it holds:"$'\n'"$contents"
done
dpkg-deb -I "$deb" conffiles | grep -qx "$conf" || fail "$conf is not a conffile"
for s in postinst prerm postrm; do
    dpkg-deb -I "$deb" "$s" >/dev/null || fail "no $s maintainer script"
done
say "contents, conffiles and maintainer scripts as expected"

# --- install -----------------------------------------------------------------
if dpkg-query -W -f '${Status}' moselle 2>/dev/null | grep -q installed; then
    say "purging a moselle package left installed"
    dpkg --purge moselle >/dev/null
fi
say "dpkg -i"
dpkg -i "$deb"
getent passwd moselle >/dev/null || fail "no moselle user after install"
[[ ! -e /etc/systemd/system/multi-user.target.wants/moselle.service ]] \
    || fail "the unit was enabled on install, before any API key exists"
systemd-analyze verify "$unit" || fail "systemd-analyze verify $unit"
# systemd's exposure score of the unit (0 best, 10 worst): 1.4 when written.
security=$(systemd-analyze security --offline=true "$unit" 2>&1 | tail -n 1)
score=$(grep -oE '[0-9]+\.[0-9]+' <<<"$security" | head -n 1)
awk -v s="${score:-10}" 'BEGIN { exit !(s <= 2.0) }' || fail "the unit's hardening slipped: $security"
say "systemd-analyze verify: ok; security: exposure $score"

secret=$(openssl rand -hex 24)
key=deb-test
printf '%s: %s\n' "$key" "$secret" >/etc/moselle/keys
chown root:moselle /etc/moselle/keys
chmod 0640 /etc/moselle/keys
as_unit /usr/bin/moselle check-config "$conf" >"$work/effective.toml" \
    || fail "check-config $conf (as the unit's user) found problems"
grep -q "assets_dir = \"$assets\"" "$work/effective.toml" || fail "the installed config does not use $assets"
say "check-config $conf: ok"

"$repo/tests/netns.sh" "$here/run.sh" --in-netns "$work" "$key" "$secret"

# --- purge -------------------------------------------------------------------
say "dpkg --purge"
dpkg --purge moselle >/dev/null
for f in /usr/bin/moselle /etc/moselle "$unit" /usr/share/moselle /usr/share/doc/moselle; do
    [[ ! -e $f ]] || fail "$f is left after purge"
done
! dpkg-query -W moselle >/dev/null 2>&1 || fail "dpkg still knows moselle after purge"
say "purged: binary, config, keys, unit and assets gone (the moselle system user stays, as Debian keeps them)"
