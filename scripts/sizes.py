#!/usr/bin/env python3
"""Keeps the rooms small: every Rust file under src/, tests/ and benches/ at most 450
lines, and every function there (tests and bench parts included) at most 80 (from its
`fn` line to its closing brace).
Prints each one over and exits 1 if there is one. `make lint` runs it."""
import pathlib, re, sys

MAX_FILE, MAX_FN = 450, 80
FN = re.compile(r"\s*(pub(\([\w: ]+\))?\s+)?(const\s+)?(async\s+)?(unsafe\s+)?fn\s+\w+")


def code(line):
    """The line without string literals and comments, so braces inside them don't count."""
    line = re.sub(r'"(\\.|[^"\\])*"', '""', line)
    line = re.sub(r"'(\\.|[^'\\])'", "' '", line)
    return line.split("//")[0]


def functions(lines):
    """(first line, length) of every function with a body."""
    for i, line in enumerate(lines):
        if not FN.match(line):
            continue
        depth, opened = 0, False
        for j in range(i, len(lines)):
            text = code(lines[j])
            if not opened and text.rstrip().endswith(";"):
                break  # a declaration in a trait
            depth += text.count("{") - text.count("}")
            opened = opened or "{" in text
            if opened and depth <= 0:
                yield i + 1, j - i + 1
                break


over = []
for top in ("src", "tests", "benches"):
    for path in sorted(pathlib.Path(top).rglob("*.rs")):
        lines = path.read_text().split("\n")
        if len(lines) - 1 > MAX_FILE:
            over.append(f"{path}: {len(lines) - 1} lines (at most {MAX_FILE})")
        for first, n in functions(lines):
            if n > MAX_FN:
                over.append(f"{path}:{first}: a function of {n} lines (at most {MAX_FN})")
for line in over:
    print(line)
if over:
    sys.exit(1)
print(f"sizes: files ≤ {MAX_FILE} lines, functions ≤ {MAX_FN} lines (src/, tests/, benches/)")
