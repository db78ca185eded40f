#!/usr/bin/env python3
"""Check deploy/systemd/memplaced.service.

Always: parse the unit and check the directives the agent's deployment depends on (the exact
capability bounding set, ProtectSystem, ProtectHome, StateDirectory and RuntimeDirectory
matching the config file's paths, Restart=on-failure, the stop timeout matching the agent's
drain, /dev/kvm allowed, other users' processes visible).

With systemd-analyze (required: without it the check fails), also:
  - `systemd-analyze verify` on a temporary copy of the unit whose ExecStart names an
    executable that exists (verify rejects a missing ExecStart binary): BINARY if given (the
    memplaced that cargo built), else /bin/true. Only that path differs from the real unit.
    verify exits 0 even for unknown keys and bad values, so any message about the unit fails;
  - that the unit's SystemCallFilter allows the syscalls the agent makes, expanding the groups
    with `systemd-analyze syscall-filter`;
  - `systemd-analyze security --offline=true`, printing the exposure level.

Usage: check_systemd.py [REPO_ROOT [BINARY]]
"""

import os
import re
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import memplaced_config  # noqa: E402

CAPABILITIES = {"CAP_SYS_PTRACE", "CAP_SYS_NICE", "CAP_CHECKPOINT_RESTORE"}
# Syscalls the agent cannot work without (placement, files, fd recovery, sockets, KVM).
SYSCALLS = ["mbind", "set_mempolicy", "get_mempolicy", "move_pages", "migrate_pages",
            "memfd_create", "fallocate", "ftruncate", "mmap", "munmap", "madvise", "ioctl",
            "pidfd_open", "pidfd_getfd", "kcmp", "sendmsg", "recvmsg", "getsockopt", "socket",
            "bind", "listen", "accept4", "clone3", "openat", "fcntl", "pread64", "pwrite64"]
MAX_EXPOSURE = 4.5


def parse_unit(path):
    """{section: {key: [values in order]}}; an empty assignment resets a list, as in systemd."""
    sections, current = {}, None
    with open(path, encoding="utf-8") as f:
        lines = f.read().replace("\\\n", " ").splitlines()
    for n, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        if current is None or "=" not in line:
            raise ValueError(f"{path}:{n}: cannot parse {line!r}")
        key, value = (s.strip() for s in line.split("=", 1))
        if value == "":
            current[key] = []
        else:
            current.setdefault(key, []).append(value)
    return sections


def syscall_groups():
    """{"@group": set of syscalls and nested groups} from systemd-analyze."""
    out = subprocess.run(["systemd-analyze", "syscall-filter"], capture_output=True, text=True, check=True).stdout
    groups, current = {}, None
    for line in out.splitlines():
        if line.startswith("@"):
            current = groups.setdefault(line.split()[0], set())
        elif current is not None and line.strip() and not line.strip().startswith("#"):
            current.add(line.strip().split()[0])
    return groups


def expand(names, groups, seen=None):
    seen = set() if seen is None else seen
    out = set()
    for name in names:
        if name.startswith("@"):
            if name not in seen:
                seen.add(name)
                out |= expand(groups.get(name, ()), groups, seen)
        else:
            out.add(name)
    return out


def main(argv):
    repo = os.path.abspath(argv[1] if len(argv) > 1 else os.path.join(HERE, "..", ".."))
    binary = argv[2] if len(argv) > 2 else None
    unit_path = os.path.join(repo, "deploy", "systemd", "memplaced.service")
    config_path = os.path.join(repo, "deploy", "systemd", "memplaced.toml")
    failures, ok = [], 0

    def expect(cond, what):
        nonlocal ok
        if cond:
            ok += 1
        else:
            failures.append(what)
            print(f"FAIL: {what}")
        return cond

    unit = parse_unit(unit_path)
    svc = unit.get("Service", {})
    last = lambda key: (svc.get(key) or [None])[-1]  # noqa: E731
    words = lambda key: {w for v in svc.get(key, []) for w in v.split()}  # noqa: E731

    cfg, problems = memplaced_config.check(config_path)
    for p in problems:
        expect(False, p)

    exec_start = last("ExecStart") or ""
    config_arg = re.search(r"--config[ =](\S+)", exec_start)
    expect(exec_start.startswith("/usr/local/bin/memplaced"), f"ExecStart is {exec_start!r}, not /usr/local/bin/memplaced")
    expect(config_arg is not None and config_arg.group(1) == "/etc/memplace/memplaced.toml",
           "ExecStart must pass --config /etc/memplace/memplaced.toml (where deploy/systemd/memplaced.toml goes)")
    expect(words("CapabilityBoundingSet") == CAPABILITIES,
           f"CapabilityBoundingSet must be exactly {sorted(CAPABILITIES)}, is {sorted(words('CapabilityBoundingSet'))}")
    expect(not words("AmbientCapabilities"), "AmbientCapabilities must stay empty")
    expect(last("ProtectSystem") == "strict", f"ProtectSystem must be strict, is {last('ProtectSystem')}")
    expect(last("ProtectHome") in ("yes", "read-only", "tmpfs"), f"ProtectHome must be set, is {last('ProtectHome')}")
    expect(last("NoNewPrivileges") == "yes", "NoNewPrivileges must be yes")
    expect(last("Restart") == "on-failure", f"Restart must be on-failure, is {last('Restart')}")
    expect(last("StateDirectory") is not None and "/var/lib/" + last("StateDirectory") == cfg["state_dir"],
           f"StateDirectory {last('StateDirectory')} must be the config's state_dir {cfg['state_dir']}")
    expect(last("RuntimeDirectory") is not None and "/run/" + last("RuntimeDirectory") == cfg["runtime_dir"],
           f"RuntimeDirectory {last('RuntimeDirectory')} must be the config's runtime_dir {cfg['runtime_dir']}")
    expect(last("RuntimeDirectoryPreserve") in ("yes", "restart"),
           "RuntimeDirectoryPreserve must keep /run/memplace across restarts (containers bind-mount it)")
    timeout = last("TimeoutStopSec") or ""
    m = re.fullmatch(r"(\d+)s?", timeout)
    expect(m is not None and int(m.group(1)) == cfg["shutdown_grace_secs"] + 5,
           f"TimeoutStopSec {timeout!r} must be shutdown_grace_secs ({cfg['shutdown_grace_secs']}) + 5 s")
    expect(last("PrivateDevices") != "yes", "PrivateDevices=yes would hide /dev/kvm")
    if last("DevicePolicy") in ("closed", "strict"):
        expect(any(v.split()[0] == "/dev/kvm" and "rw" in v.split()[1:2] for v in svc.get("DeviceAllow", [])),
               "DevicePolicy is closed but DeviceAllow lacks /dev/kvm rw")
    expect(last("ProtectProc") in (None, "default", "noaccess") and last("ProtectProc") != "invisible",
           "ProtectProc must not hide other users' processes: the agent needs the VMMs'")
    expect(last("PrivateUsers") != "yes", "PrivateUsers would strip the capabilities over host processes")
    expect(last("User") in (None, "root", "0"), "the agent runs as root (see the unit's comments)")

    analyze = shutil.which("systemd-analyze")
    if expect(analyze is not None,
              "systemd-analyze is not installed (Debian package systemd; .ci/test installs it), so "
              "the unit cannot be verified by systemd nor its SystemCallFilter checked"):
        target = binary if binary and os.access(binary, os.X_OK) else "/bin/true"
        with tempfile.TemporaryDirectory() as tmp:
            copy = os.path.join(tmp, "memplaced.service")
            with open(unit_path, encoding="utf-8") as f:
                text = f.read()
            text, count = re.subn(r"^ExecStart=/usr/local/bin/memplaced", f"ExecStart={target}", text, flags=re.M)
            expect(count == 1, "could not point the temporary unit's ExecStart at an existing binary")
            with open(copy, "w", encoding="utf-8") as f:
                f.write(text)
            proc = subprocess.run([analyze, "verify", copy], capture_output=True, text=True)
            messages = (proc.stdout + proc.stderr).strip()
            print(f"systemd-analyze verify: ran on a copy of the unit whose ExecStart is {target} "
                  "(the real path /usr/local/bin/memplaced is not installed here); otherwise unchanged")
            expect(proc.returncode == 0 and not messages,
                   f"systemd-analyze verify complained (exit {proc.returncode}):\n{messages}")

            sec = subprocess.run([analyze, "security", "--offline=true", copy], capture_output=True, text=True)
            m = re.search(r"Overall exposure level for \S+: ([0-9.]+) (\w+)", sec.stdout)
            if expect(m is not None, f"systemd-analyze security gave no exposure level: {sec.stderr.strip()}"):
                print(f"systemd-analyze security: exposure {m.group(1)} {m.group(2)}")
                expect(float(m.group(1)) <= MAX_EXPOSURE,
                       f"exposure {m.group(1)} is above {MAX_EXPOSURE}: the hardening regressed")

        allowed_names = [w for v in svc.get("SystemCallFilter", []) for w in v.split()]
        if allowed_names and not allowed_names[0].startswith("~"):
            allowed = expand(allowed_names, syscall_groups())
            missing = [s for s in SYSCALLS if s not in allowed]
            expect(not missing, f"SystemCallFilter blocks syscalls the agent needs: {missing}")

    if failures:
        print(f"check_systemd: {len(failures)} checks FAILED, {ok} ok")
        return 1
    print(f"check_systemd: all {ok} checks ok")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
