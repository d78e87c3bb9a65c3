#!/usr/bin/env python3
"""Checks that the module tree in docs/design.md lists exactly the files under src/.

The tree is the first fenced block whose first line is `src/`; each line is a file or a
`dir/`, indented two spaces per level. Exits 1 naming what is missing on either side.
"""
import os
import re
import sys

root = sys.argv[1] if len(sys.argv) > 1 else "."
lines = open(os.path.join(root, "docs/design.md"), encoding="utf-8").read().split("\n")
start = next((i for i, l in enumerate(lines) if l.strip() == "src/"), None)
if start is None:
    sys.exit("docs/design.md has no module tree (a line `src/` in a code block)")
listed, stack = set(), []
for line in lines[start:]:
    if line.startswith("```"):
        break
    m = re.match(r"^( *)(\S+)", line)
    if not m:
        continue
    depth, name = len(m.group(1)) // 2, m.group(2)
    stack = stack[:depth]
    if name.endswith("/"):
        stack.append(name.rstrip("/"))
    else:
        listed.add("/".join(stack + [name]))
present = {
    os.path.relpath(os.path.join(d, f), root)
    for d, _, fs in os.walk(os.path.join(root, "src"))
    for f in fs
    if f.endswith(".rs")
}
missing, stale = sorted(present - listed), sorted(listed - present)
for f in missing:
    print(f"docs/design.md: the module tree does not list {f}")
for f in stale:
    print(f"docs/design.md: the module tree lists {f}, which is not in src/")
if missing or stale:
    sys.exit(1)
print(f"docs/design.md: the module tree lists the {len(present)} files of src/")
