"""The keys of memplaced's TOML config file, for checking the deployment's copies of it.

The agent itself parses the file with deny_unknown_fields; server/tests/deploy_manifests.rs
also runs `memplaced --config FILE --check-config` on every file when the binary is built.
This copy lets the manifests be checked without building the agent, and lets the tests read
the values that the manifests must agree with (paths, the shutdown grace, the metrics port).
"""

import re
import tomllib

DEFAULTS = {
    "state_dir": "/var/lib/memplace",
    "runtime_dir": "/run/memplace",
    "listen_tcp": None,
    "log_level": "info",
    "log_format": "human",
    "metrics_addr": "127.0.0.1:9464",
    "reconcile_interval_secs": 30,
    "shutdown_grace_secs": 10,
    "socket_mode": "0660",
    "admin_uids": [0],
    "viewer_uids": [],
    "handoff_uids": [0],
    "tls_cert": None,
    "tls_key": None,
    "tls_client_ca": None,
    "insecure_tcp": False,
    "max_regions": 4096,
    "max_ranges_per_region": 256,
    "max_region_bytes": 1 << 40,
    "request_timeout_secs": 30,
    "max_concurrent_requests": 64,
    "max_message_bytes": 4 << 20,
    "placement_map_max_bytes": 16 << 30,
    "request_record_max_age_secs": 86400,
    "request_record_max_count": 100000,
    "request_tombstone_max_age_secs": 30 * 86400,
    "request_tombstone_max_count": 500000,
}

_STRINGS = {"state_dir", "runtime_dir", "listen_tcp", "metrics_addr", "socket_mode",
            "tls_cert", "tls_key", "tls_client_ca"}
_UID_LISTS = {"admin_uids", "viewer_uids", "handoff_uids"}
_COUNTS = {"max_regions", "max_ranges_per_region", "max_region_bytes", "request_timeout_secs",
           "max_concurrent_requests", "max_message_bytes", "request_record_max_age_secs",
           "request_record_max_count"}
# 0 means "never" for these.
_SECONDS = {"reconcile_interval_secs", "shutdown_grace_secs"}
# 0 means "keep none" for these (tombstones, pages kept mapped).
_TOMBSTONES = {"request_tombstone_max_age_secs", "request_tombstone_max_count",
               "placement_map_max_bytes"}


def check(path):
    """Parse a config file; returns (effective config, list of problems)."""
    with open(path, "rb") as f:
        try:
            raw = tomllib.load(f)
        except tomllib.TOMLDecodeError as e:
            return dict(DEFAULTS), [f"{path}: not TOML: {e}"]
    problems = []
    for key in sorted(set(raw) - set(DEFAULTS)):
        problems.append(f"{path}: unknown key {key!r} (the agent rejects unknown keys)")
    for key, value in raw.items():
        if key in _STRINGS and not isinstance(value, str):
            problems.append(f"{path}: {key} must be a string")
        elif key in _UID_LISTS and not (isinstance(value, list)
                                        and all(type(v) is int and v >= 0 for v in value)):
            problems.append(f"{path}: {key} must be a list of uids")
        elif key in _COUNTS and not (type(value) is int and value > 0):
            problems.append(f"{path}: {key} must be a positive integer")
        elif key in (_SECONDS | _TOMBSTONES) and not (type(value) is int and value >= 0):
            problems.append(f"{path}: {key} must be a non-negative integer")
    effective = dict(DEFAULTS)
    effective.update(raw)
    # A level or a tracing filter such as "info,memplace_server=debug".
    if not re.fullmatch(r"[A-Za-z0-9_:=,.\-]+", str(effective["log_level"])):
        problems.append(f"{path}: log_level {effective['log_level']!r} is not a level or filter")
    if effective["log_format"] not in ("human", "json"):
        problems.append(f"{path}: log_format must be human or json")
    mode = effective["socket_mode"]
    if not (isinstance(mode, str) and re.fullmatch(r"(0o?)?[0-7]{1,3}", mode)):
        problems.append(f"{path}: socket_mode must be an octal string such as \"0660\"")
    if effective["metrics_addr"] != "off" and port_of(effective["metrics_addr"]) is None:
        problems.append(f"{path}: metrics_addr must be host:port or off")
    if type(effective["max_message_bytes"]) is int and effective["max_message_bytes"] < 1024:
        problems.append(f"{path}: max_message_bytes must be at least 1024")
    if not isinstance(effective["insecure_tcp"], bool):
        problems.append(f"{path}: insecure_tcp must be a boolean")
    if effective["listen_tcp"] is not None:
        tls = [effective[k] for k in ("tls_cert", "tls_key", "tls_client_ca") if effective[k] is not None]
        if len(tls) not in (0, 3):
            problems.append(f"{path}: TLS needs all of tls_cert, tls_key and tls_client_ca")
        elif not tls and effective["insecure_tcp"] is not True:
            problems.append(f"{path}: listen_tcp without TLS needs insecure_tcp = true")
    return effective, problems


def port_of(addr):
    """The port of a host:port or [v6]:port address, or None."""
    m = re.fullmatch(r"(\[[0-9A-Fa-f:.]+\]|[^:\[\]]+):(\d{1,5})", str(addr))
    return int(m.group(2)) if m else None
