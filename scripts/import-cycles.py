#!/usr/bin/env python3
"""Checks that the crate's modules import each other without circles.

Builds the module graph of src/ (one node per file) from `use crate::…`, `use super::…`,
`use self::…` and inline `crate::a::b` paths outside `#[cfg(test)] mod tests`, prints
every cycle, and exits 1 if there is one. A parent's `mod child;` is not an import; a
child naming its parent is. `make lint` runs it."""
import os, re, sys
root = sys.argv[1] if len(sys.argv) > 1 else "src"
mods = {}
for dp, _, fs in os.walk(root):
    for f in fs:
        if not f.endswith(".rs"): continue
        p = os.path.join(dp, f)
        rel = os.path.relpath(p, root)[:-3].split(os.sep)
        if rel[-1] in ("mod", "lib", "main"): rel = rel[:-1]
        mods["::".join(rel)] = p
def resolve(cur, path):
    parts = path.split("::")
    if parts[0] == "crate": base = []; parts = parts[1:]
    elif parts[0] == "super": base = cur.split("::")[:-1] if cur else []; parts = parts[1:]
    elif parts[0] == "self": base = cur.split("::") if cur else []; parts = parts[1:]
    else: return None
    while parts and parts[0] == "super": base = base[:-1]; parts = parts[1:]
    best = None
    for i in range(len(parts), -1, -1):
        cand = "::".join(base + parts[:i])
        if cand in mods: best = cand; break
    return best
edges = {m: set() for m in mods}
for m, p in mods.items():
    src = open(p).read()
    src = re.split(r"#\[cfg\(test\)\]\s*mod tests", src)[0]
    src = re.sub(r"//[^\n]*", "", src)  # comments name modules without importing them
    for mm in re.finditer(r"\b((?:crate|super|self)(?:::[A-Za-z_][A-Za-z0-9_]*)+)(::\{([^;]*?)\})?", src):
        head = mm.group(1); group = mm.group(3)
        targets = [head]
        if group:
            for item in re.split(r",", re.sub(r"\{[^}]*\}", "", group)):
                item = item.strip().split(" as ")[0]
                if item and item != "self": targets.append(head + "::" + item)
        for t in targets:
            r = resolve(m, t)
            if r is not None and r != m:
                edges[m].add(r)
cycles = set()
def dfs(start, node, path, seen):
    for n in edges[node]:
        if n == start: cycles.add(tuple(sorted(path)))
        elif n not in seen and n > start: dfs(start, n, path + [n], seen | {n})
for m in mods: dfs(m, m, [m], {m})
for c in sorted(cycles): print("cycle:", " -> ".join(c))
print(f"{len(mods)} modules, {sum(len(e) for e in edges.values())} import edges, {len(cycles)} cycles")
sys.exit(1 if cycles else 0)
