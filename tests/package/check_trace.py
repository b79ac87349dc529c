"""Does a traced run of the server stay within its systemd unit's sandbox?

    check_trace.py UNIT_FILE STRACE_LOG

systemd is not PID 1 on the test machines, so the unit's seccomp and
namespace settings cannot be applied there. Instead the installed binary
runs under `strace -f` through a real call, and every system call, socket
family, executable mapping and file it opened is held against the unit:
SystemCallFilter=, RestrictAddressFamilies=, MemoryDenyWriteExecute=,
ProtectSystem=strict (with PrivateTmp=), ProtectHome=, ProcSubset=pid and
PrivateDevices=. Prints what it checked; exits 1 naming what the unit would
have refused (under systemd that is an EPERM or a missing file, often a
silent failure of the node).
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections import Counter
from functools import lru_cache


def unit_settings(path: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    section = ""
    for raw in open(path, encoding="utf-8"):
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line
            continue
        if section == "[Service]" and "=" in line:
            k, v = line.split("=", 1)
            out.setdefault(k.strip(), []).append(v.strip())
    return out


@lru_cache(maxsize=None)
def syscall_group(name: str) -> frozenset[str]:
    """A systemd syscall group (@name), nested groups expanded."""
    text = subprocess.run(
        ["systemd-analyze", "syscall-filter", name], check=True, capture_output=True, text=True
    ).stdout
    calls: set[str] = set()
    for line in text.splitlines()[1:]:
        item = line.strip()
        if not item or item.startswith("#"):
            continue
        calls |= syscall_group(item) if item.startswith("@") else {item}
    return frozenset(calls)


def allowed_syscalls(filters: list[str]) -> tuple[set[str], set[str]]:
    allow: set[str] = set()
    deny: set[str] = set()
    for f in filters:
        neg = f.startswith("~")
        for item in f.lstrip("~").split():
            names = syscall_group(item) if item.startswith("@") else {item}
            (deny if neg else allow).update(names)
    return allow, deny


# Reads the sandbox refuses that the program expects to fail: glibc's malloc
# asks for the overcommit policy and, without the file, keeps its default.
EXPECTED_MISSING = {"/proc/sys/vm/overcommit_memory"}

CALL = re.compile(r"^\d+\s+([a-z0-9_]+)\((.*)$")
PATH_ARG = re.compile(r'^(?:AT_FDCWD|\d+), "([^"]*)"')


def main() -> int:
    unit_path, trace_path = sys.argv[1:3]
    unit = unit_settings(unit_path)
    calls: Counter[str] = Counter()
    families: set[str] = set()
    wx: list[str] = []
    opened: set[tuple[str, bool]] = set()
    for line in open(trace_path, encoding="utf-8", errors="replace"):
        m = CALL.match(line)
        if not m:
            continue
        name, args = m.groups()
        calls[name] += 1
        if name in ("socket", "socketpair"):
            families.add(args.split(",", 1)[0])
        elif name == "mmap" and re.search(r"PROT_WRITE\|PROT_EXEC|PROT_EXEC\|PROT_WRITE", args):
            wx.append(line.strip())
        elif name in ("mprotect", "pkey_mprotect") and "PROT_EXEC" in args:
            wx.append(line.strip())
        elif name in ("open", "openat", "openat2", "creat"):
            p = PATH_ARG.match(args) if name != "open" else re.match(r'"([^"]*)"', args)
            if p:
                writes = bool(re.search(r"O_WRONLY|O_RDWR|O_CREAT|O_TRUNC", args)) or name == "creat"
                opened.add((p.group(1), writes))
    if not calls:
        print(f"check_trace: no system calls in {trace_path}", file=sys.stderr)
        return 1

    problems: list[str] = []

    allow, deny = allowed_syscalls(unit.get("SystemCallFilter", []))
    if allow or deny:
        refused = sorted(c for c in calls if (allow and c not in allow) or c in deny)
        if refused:
            problems.append(
                "SystemCallFilter refuses: " + ", ".join(f"{c} ({calls[c]}x)" for c in refused)
            )
    fam_allowed = set(" ".join(unit.get("RestrictAddressFamilies", [])).split())
    if fam_allowed:
        bad = sorted(families - fam_allowed)
        if bad:
            problems.append(f"RestrictAddressFamilies refuses sockets of {', '.join(bad)}")
    if unit.get("MemoryDenyWriteExecute", ["no"])[-1] == "yes" and wx:
        problems.append("MemoryDenyWriteExecute refuses: " + "; ".join(wx[:5]))

    writable = ("/dev/",)
    if unit.get("PrivateTmp", ["no"])[-1] == "yes":
        writable += ("/tmp/", "/var/tmp/")
    dev_ok = {"/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom", "/dev/tty"}
    for path, writes in sorted(opened):
        if unit.get("ProtectSystem", [""])[-1] == "strict" and writes and not path.startswith(writable):
            problems.append(f"ProtectSystem=strict: opened {path} for writing")
        if unit.get("ProtectHome", ["no"])[-1] in ("yes", "read-only", "tmpfs") and path.startswith(
            ("/home", "/root", "/run/user")
        ):
            problems.append(f"ProtectHome: opened {path}")
        if unit.get("ProcSubset", ["all"])[-1] == "pid" and path.startswith("/proc/"):
            first = path.split("/")[2]
            if not (first in ("self", "thread-self") or first.isdigit()) and path not in EXPECTED_MISSING:
                problems.append(f"ProcSubset=pid hides {path}")
        if unit.get("PrivateDevices", ["no"])[-1] == "yes" and path.startswith("/dev/"):
            if path not in dev_ok and not path.startswith(("/dev/shm/", "/dev/pts/", "/dev/fd/")):
                problems.append(f"PrivateDevices hides {path}")

    print(
        f"check_trace: {sum(calls.values())} system calls of {len(calls)} kinds, "
        f"socket families {sorted(families)}, {len(opened)} files opened, "
        f"{len(wx)} writable+executable mappings"
    )
    for p in problems:
        print(f"check_trace: {p}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
