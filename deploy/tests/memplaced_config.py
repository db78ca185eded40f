"""The keys of memplaced's TOML config file, for checking the deployment's copies of it.

The agent itself parses the file with deny_unknown_fields; server/tests/deploy_manifests.rs
also runs `memplaced --config FILE --check-config` on every file when the binary is built.
This copy lets the manifests be checked without building the agent, and lets the tests read
the values that the manifests must agree with (paths, the shutdown grace, the metrics port).
"""

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
}

_STRINGS = {"state_dir", "runtime_dir", "listen_tcp", "metrics_addr", "socket_mode",
            "tls_cert", "tls_key", "tls_client_ca"}
_UID_LISTS = {"admin_uids", "viewer_uids", "handoff_uids"}
_COUNTS = {"reconcile_interval_secs", "max_regions", "max_ranges_per_region", "max_region_bytes",
           "request_timeout_secs", "max_concurrent_requests", "max_message_bytes"}


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
    if raw.get("log_level", "info") not in ("trace", "debug", "info", "warn", "error"):
        problems.append(f"{path}: log_level {raw['log_level']!r} is not a level")
    if raw.get("log_format", "human") not in ("human", "json"):
        problems.append(f"{path}: log_format must be human or json")
    grace = raw.get("shutdown_grace_secs", 10)
    if not (type(grace) is int and grace >= 0):
        problems.append(f"{path}: shutdown_grace_secs must be a non-negative integer")
    mode = raw.get("socket_mode", "0660")
    if not (isinstance(mode, str) and len(mode) in (3, 4) and all(c in "01234567" for c in mode)):
        problems.append(f"{path}: socket_mode must be an octal string such as \"0660\"")
    if not isinstance(raw.get("insecure_tcp", False), bool):
        problems.append(f"{path}: insecure_tcp must be a boolean")
    effective = dict(DEFAULTS)
    effective.update(raw)
    return effective, problems


def port_of(addr):
    """The port of a host:port or [v6]:port address."""
    return int(addr.rsplit(":", 1)[1])
