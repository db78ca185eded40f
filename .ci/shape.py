#!/usr/bin/env python3
"""The code's shape, checked in CI: no Rust file over 600 lines before its test module, and no
function over 120 lines, in every crate's sources, benches and examples. Integration tests
(`*/tests/`) are test modules as a whole: a scenario test declares its checks in one list and
runs them in order, so neither limit applies there. Prints every offender and exits 1 when there
is one."""
import pathlib
import re
import sys

MAX_FILE = 600
MAX_FN = 120
ROOT = pathlib.Path(__file__).resolve().parent.parent
SKIP = {"target", ".git", "node_modules"}
FN = re.compile(r"^\s*(pub(\([^)]*\))?\s+)?(const\s+)?(async\s+)?(unsafe\s+)?(extern\s+\"C\"\s+)?fn\s+(\w+)")


def rust_files():
    for p in sorted(ROOT.rglob("*.rs")):
        parts = p.relative_to(ROOT).parts
        if not SKIP.intersection(parts) and "tests" not in parts:
            yield p


def lines_before_tests(lines):
    """Lines before the first `#[cfg(test)]` that opens a module (the file's own tests)."""
    for i, line in enumerate(lines):
        if line.strip() == "#[cfg(test)]" and i + 1 < len(lines) and re.match(r"\s*(pub(\(\w+\))?\s+)?mod\s+\w+", lines[i + 1]):
            return i
    return len(lines)


def functions(lines):
    """(name, first line, length) of each fn with a body, by brace matching from its signature
    (strings and comments are skipped well enough for rustfmt-formatted code)."""
    out = []
    for i, line in enumerate(lines):
        m = FN.match(line)
        if not m:
            continue
        depth, started, j = 0, False, i
        while j < len(lines):
            code = re.sub(r'//.*$', '', re.sub(r'"(\\.|[^"\\])*"', '""', lines[j]))
            code = re.sub(r"'(\\.|[^'\\])'", "''", code)
            if not started and ";" in code and "{" not in code:
                break  # a declaration without a body (trait item)
            for ch in code:
                if ch == "{":
                    depth += 1
                    started = True
                elif ch == "}":
                    depth -= 1
            if started and depth <= 0:
                out.append((m.group(7), i + 1, j - i + 1))
                break
            j += 1
    return out


def main():
    bad = []
    for p in rust_files():
        lines = p.read_text().splitlines()
        rel = p.relative_to(ROOT)
        n = lines_before_tests(lines)
        if n > MAX_FILE:
            bad.append(f"{rel}: {n} lines before its test module (at most {MAX_FILE})")
        for name, at, length in functions(lines):
            if length > MAX_FN:
                bad.append(f"{rel}:{at}: fn {name} is {length} lines (at most {MAX_FN})")
    for b in bad:
        print(b)
    if bad:
        print(f"shape: {len(bad)} offence(s)", file=sys.stderr)
        return 1
    print(f"shape: every Rust file is at most {MAX_FILE} lines before its tests and every fn at most {MAX_FN} lines")
    return 0


if __name__ == "__main__":
    sys.exit(main())
