#!/usr/bin/env python3
"""Check deploy/Dockerfile without a Docker engine (none runs where the tests do).

It parses the Dockerfile (line continuations, comments, parser directives, build args) and
checks that:
  - every instruction is a Dockerfile instruction and the file starts with FROM (after ARGs);
  - stage names are unique, and every COPY --from names an earlier stage;
  - every file COPY takes from the build context (the repository root) exists and is not
    excluded by deploy/Dockerfile.dockerignore, and every workspace member is copied;
  - the builder is rust:1.95-bookworm, at least the workspace's rust-version, and runs
    cargo build --release --locked -p memplace-server -p memplacectl;
  - the runtime stage is debian:bookworm-slim, has memplaced and memplacectl in
    /usr/local/bin, the OCI labels, an explicit USER, and memplaced as its entrypoint;
  - the registry-less target runtime-prebuilt (deploy/build-image.sh) is built on the same
    runtime stage as the default target and only adds the two binaries from its own context.
A stage FROM an earlier stage inherits that stage's base image and instructions. The image itself
is built by deploy/build-image.sh and run by server/tests/container_pod.rs.

Usage: check_dockerfile.py [REPO_ROOT]
"""

import fnmatch
import glob
import json
import os
import re
import shlex
import sys
import tomllib

HERE = os.path.dirname(os.path.abspath(__file__))
INSTRUCTIONS = {"FROM", "RUN", "CMD", "LABEL", "MAINTAINER", "EXPOSE", "ENV", "ADD", "COPY",
                "ENTRYPOINT", "VOLUME", "USER", "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL",
                "HEALTHCHECK", "SHELL"}
OCI_LABELS = {"org.opencontainers.image.title", "org.opencontainers.image.description",
              "org.opencontainers.image.version", "org.opencontainers.image.revision",
              "org.opencontainers.image.licenses"}
BUILD = "cargo build --release --locked -p memplace-server -p memplacectl"
# The registry-less target: the runtime stage plus binaries that deploy/build-image.sh puts in
# its build context.
PREBUILT = "runtime-prebuilt"


def parse(text):
    """Instructions as (line number, KEYWORD, rest of the line), continuations joined."""
    out, buf, start = [], "", None
    directives_open = True
    for n, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if directives_open and re.match(r"#\s*\w+\s*=", stripped):
            continue  # a parser directive such as "# syntax=..."
        directives_open = False
        if not buf and (not stripped or stripped.startswith("#")):
            continue
        if buf and stripped.startswith("#"):
            continue  # comments inside a continued instruction are dropped, as Docker does
        if start is None:
            start = n
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        buf += stripped
        if "<<" in buf.split("#")[0] and re.search(r"<<-?\s*['\"]?[A-Z]+", buf):
            raise ValueError(f"line {start}: heredocs are not supported by this checker")
        keyword, _, rest = buf.partition(" ")
        out.append((start, keyword.upper(), rest.strip()))
        buf, start = "", None
    if buf:
        raise ValueError("the Dockerfile ends inside a continued line")
    return out


def flags_and_args(rest):
    """Split '--flag=value ... args' (shell words)."""
    words = shlex.split(rest)
    flags = {}
    while words and words[0].startswith("--"):
        key, _, value = words.pop(0)[2:].partition("=")
        flags.setdefault(key, []).append(value)
    return flags, words


def substitute(text, args):
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m.group(1) or m.group(2), m.group(0)), text)


def dockerignore(repo):
    path = os.path.join(repo, "deploy", "Dockerfile.dockerignore")
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [ln.strip() for ln in f if ln.strip() and not ln.strip().startswith("#")]


def ignored(rel, patterns):
    hit = False
    for p in patterns:
        neg = p.startswith("!")
        p = p.lstrip("!").strip("/")
        parts = rel.split("/")
        prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
        if any(fnmatch.fnmatch(pre, p) or fnmatch.fnmatch(pre, p.replace("**/", "")) for pre in prefixes):
            hit = not neg
    return hit


def main(argv):
    repo = os.path.abspath(argv[1] if len(argv) > 1 else os.path.join(HERE, "..", ".."))
    path = os.path.join(repo, "deploy", "Dockerfile")
    failures = []
    ok = 0

    def expect(cond, what):
        nonlocal ok
        if cond:
            ok += 1
        else:
            failures.append(what)
            print(f"FAIL: {what}")
        return cond

    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        instructions = parse(text)
    except ValueError as e:
        print(f"FAIL: deploy/Dockerfile does not parse: {e}")
        return 1
    print(f"parsed deploy/Dockerfile: {len(instructions)} instructions")

    global_args, stages = {}, []
    for n, kw, rest in instructions:
        expect(kw in INSTRUCTIONS, f"line {n}: unknown instruction {kw}")
        if kw == "ARG" and not stages:
            name, _, default = rest.partition("=")
            global_args[name.strip()] = default.strip().strip('"')
            continue
        if not stages:
            expect(kw == "FROM", f"line {n}: the first instruction after ARGs must be FROM, is {kw}")
        if kw == "FROM":
            flags, words = flags_and_args(rest)
            image = substitute(words[0], global_args) if words else ""
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            expect(len(words) in (1, 3) and "$" not in image, f"line {n}: cannot read FROM {rest}")
            if name:
                expect(name not in [s["name"] for s in stages], f"line {n}: stage name {name} used twice")
            parent = next((s for s in stages if s["name"] == image), None)
            stages.append({"name": name, "image": parent["image"] if parent else image,
                           "parent": parent["name"] if parent else None,
                           "inherited": (parent["inherited"] + parent["lines"]) if parent else [],
                           "lines": [], "args": dict(global_args)})
            continue
        stages[-1]["lines"].append((n, kw, rest))

    if not expect(len(stages) >= 2, "the Dockerfile must be multi-stage (a builder and a runtime)"):
        return 1
    builder, runtime = stages[0], stages[-1]
    patterns = dockerignore(repo)

    for i, stage in enumerate(stages):
        for n, kw, rest in stage["lines"]:
            if kw == "ARG":
                name, _, default = rest.partition("=")
                stage["args"][name.strip()] = default.strip().strip('"')
            if kw not in ("COPY", "ADD"):
                continue
            flags, words = flags_and_args(rest)
            if rest.lstrip().startswith("["):
                words = json.loads(rest[rest.index("["):])
            expect(len(words) >= 2, f"line {n}: {kw} needs sources and a destination")
            sources = words[:-1]
            if stage["name"] == PREBUILT:
                expect(sorted(os.path.basename(w) for w in sources) == ["memplacectl", "memplaced"],
                       f"line {n}: {PREBUILT} must copy exactly memplaced and memplacectl from its context")
                continue
            if "from" in flags:
                src_stage = flags["from"][0]
                earlier = [s["name"] for s in stages[:i]] + [str(k) for k in range(i)]
                expect(src_stage in earlier, f"line {n}: COPY --from={src_stage} names no earlier stage")
                continue
            for src in sources:
                hits = glob.glob(os.path.join(repo, src))
                expect(bool(hits), f"line {n}: {kw} source {src} does not exist in the repository")
                for h in hits:
                    rel = os.path.relpath(h, repo)
                    expect(not ignored(rel, patterns),
                           f"line {n}: {kw} source {src} is excluded by deploy/Dockerfile.dockerignore")

    # Builder.
    expect(builder["image"] == "rust:1.95-bookworm", f"builder image is {builder['image']}, not rust:1.95-bookworm")
    with open(os.path.join(repo, "Cargo.toml"), "rb") as f:
        cargo = tomllib.load(f)
    need = cargo["workspace"]["package"].get("rust-version")
    m = re.match(r"rust:(\d+)\.(\d+)", builder["image"])
    if need and m:
        have = (int(m.group(1)), int(m.group(2)))
        want = tuple(int(x) for x in need.split(".")[:2])
        expect(have >= want, f"builder Rust {have} is older than the workspace's rust-version {need}")
    runs = " ".join(" ".join(rest.split()) for _, kw, rest in builder["lines"] if kw == "RUN")
    expect(BUILD in runs, f"the builder does not run `{BUILD}`")
    copied = set()
    for _, kw, rest in builder["lines"]:
        if kw == "COPY":
            _, words = flags_and_args(rest)
            copied |= {w.rstrip("/").removeprefix("./") for w in words[:-1]}
    for member in cargo["workspace"]["members"] + ["Cargo.toml", "Cargo.lock"]:
        expect(member in copied, f"the builder does not copy {member} (a workspace member or manifest)")
    for extra in ("migrations", ".sqlx", ".cargo", "rust-toolchain.toml"):
        if os.path.exists(os.path.join(repo, extra)):
            expect(extra in copied, f"the repository has {extra}, which the build may need, but the builder does not copy it")

    # Runtime.
    expect(runtime["image"] == "debian:bookworm-slim", f"runtime image is {runtime['image']}, not debian:bookworm-slim")
    installed = set()
    labels = set()
    user = entrypoint = None
    prebuilt = next((s for s in stages if s["name"] == PREBUILT), None)
    if expect(prebuilt is not None, f"no {PREBUILT} stage (the target deploy/build-image.sh builds)"):
        expect(prebuilt["parent"] is not None and prebuilt["parent"] == runtime["parent"],
               f"{PREBUILT} must be built FROM the same runtime stage as the default target "
               f"({prebuilt['parent']} vs {runtime['parent']})")
        with open(os.path.join(repo, "deploy", "build-image.sh"), encoding="utf-8") as f:
            script = f.read()
        expect(f"--target {PREBUILT}" in script and BUILD in script,
               f"deploy/build-image.sh must build --target {PREBUILT} from `{BUILD}`")
    for n, kw, rest in runtime["inherited"] + runtime["lines"]:
        if kw == "COPY":
            flags, words = flags_and_args(rest)
            dest = words[-1]
            for src in words[:-1]:
                installed.add(os.path.join(dest, os.path.basename(src)) if dest.endswith("/") else dest)
        elif kw == "LABEL":
            labels |= {w.split("=", 1)[0] for w in shlex.split(rest)}
        elif kw == "USER":
            user = rest
        elif kw == "ENTRYPOINT":
            try:
                entrypoint = json.loads(rest)
            except json.JSONDecodeError:
                expect(False, f"line {n}: ENTRYPOINT should be exec (JSON) form, so memplaced gets SIGTERM")
    for binary in ("memplaced", "memplacectl"):
        expect(f"/usr/local/bin/{binary}" in installed, f"the runtime stage does not install /usr/local/bin/{binary}")
    missing = OCI_LABELS - labels
    expect(not missing, f"the runtime stage lacks OCI labels {sorted(missing)}")
    expect(user is not None, "the runtime stage sets no USER: say which user it runs as, and why")
    expect(entrypoint is not None and entrypoint[0].endswith("/memplaced"), f"ENTRYPOINT is {entrypoint}, not memplaced")

    if failures:
        print(f"check_dockerfile: {len(failures)} checks FAILED, {ok} ok")
        return 1
    print(f"check_dockerfile: all {ok} checks ok")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
