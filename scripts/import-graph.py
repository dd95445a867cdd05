#!/usr/bin/env python3
"""The module import graph of src/: which module imports which, through `use crate::...`,
`use super::...` and `crate::` / `super::` paths in code (comments and strings skipped).

Reports
  (a) imports that run back up: from a top-level module to one of a higher layer (the one it
      serves), by the layer order in LAYERS below;
  (b) import cycles (strongly connected files) whose files lie in more than one folder.

Names re-exported with `pub use` are followed to the module that defines them, so
`crate::DeviceTensor` is an import of `tensor`, not of the crate root. A file `x.rs` next to
a folder `x/` belongs to that folder, as `x/mod.rs` would.

Usage: scripts/import-graph.py [--edges] [--allow PATH]...
  --edges   also print every import edge (file -> file)
  --allow   leave violations involving this file (relative to the repository) out of the
            verdict; they are still listed, marked "allowed"
Exits 1 when a violation that is not allowed is found.
"""

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src"

# Top-level modules of src/, lowest first: a module may import from its own layer and the
# ones before it. Modules on one line share a layer.
LAYERS = [
    ["error", "dtype"],
    ["cuda_probe"],
    ["config"],
    ["kernels"],
    ["device"],
    ["tensor"],
    ["problem"],
    ["options", "varlen"],
    ["paged"],
    ["kv_cache"],
    ["reference"],
    ["backend"],
    ["legacy"],
    ["crate"],
]
RANK = {m: i for i, layer in enumerate(LAYERS) for m in layer}


def strip(text):
    """Source without comments, string and char literals (kept line breaks)."""
    out, i, n = [], 0, len(text)
    while i < n:
        c = text[i]
        if text.startswith("//", i):
            j = text.find("\n", i)
            i = n if j < 0 else j
        elif text.startswith("/*", i):
            depth, i = 1, i + 2
            while i < n and depth:
                if text.startswith("/*", i):
                    depth, i = depth + 1, i + 2
                elif text.startswith("*/", i):
                    depth, i = depth - 1, i + 2
                else:
                    out.append("\n" if text[i] == "\n" else "")
                    i += 1
        elif c == "r" and re.match(r'r#*"', text[i:]) and not re.match(r"\w", text[i - 1 : i] or " "):
            m = re.match(r'r(#*)"', text[i:])
            end = text.find('"' + m.group(1), i + len(m.group(0)))
            end = n if end < 0 else end + 1 + len(m.group(1))
            out.append('""' + "\n" * text.count("\n", i, end))
            i = end
        elif c == '"':
            j = i + 1
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            out.append('""' + "\n" * text.count("\n", i, j))
            i = j + 1
        elif c == "'" and re.match(r"'(\\.|[^\\'])'", text[i:]):
            m = re.match(r"'(\\.|[^\\'])'", text[i:])
            out.append("' '")
            i += len(m.group(0))
        else:
            out.append(c)
            i += 1
    return "".join(out)


def module_of(path):
    """Module path (tuple) of a file below src/."""
    rel = path.relative_to(SRC).with_suffix("")
    parts = list(rel.parts)
    if parts == ["lib"]:
        return ()
    if parts[-1] == "mod":
        parts.pop()
    return tuple(parts)


def folder_of(path):
    """The folder a file belongs to: its own for mod.rs / lib.rs, x/ for an x.rs beside x/."""
    if path.with_suffix("").is_dir():
        return path.with_suffix("").relative_to(ROOT).as_posix()
    return path.parent.relative_to(ROOT).as_posix()


def expand(tree):
    """`a::{b, c::{d, e}}` -> ["a::b", "a::c::d", "a::c::e"]."""
    tree = re.sub(r"\s+", "", tree)
    m = re.search(r"\{", tree)
    if not m:
        return [tree]
    head, body = tree[: m.start()], tree[m.start() + 1 :]
    depth, parts, cur = 0, [], ""
    for ch in body:
        if ch == "{":
            depth += 1
        elif ch == "}":
            if depth == 0:
                break
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    return [x for p in parts if p for x in expand(head + p)]


USE = re.compile(r"\b(pub(?:\([^)]*\))?\s+)?use\s+([^;]+);")
INLINE = re.compile(r"(?<![\w:])(crate|super)((?:::\w+)+)")
MOD_OPEN = re.compile(r"\bmod\s+\w+\s*\{")


def scopes(code):
    """For each offset, how many inline `mod x { ... }` blocks enclose it (as a list of
    (start, end, depth) spans)."""
    spans, stack, depth = [], [], 0
    opens = {m.end() - 1 for m in MOD_OPEN.finditer(code)}
    for i, ch in enumerate(code):
        if ch == "{":
            depth += 1
            if i in opens:
                stack.append((i, depth))
        elif ch == "}":
            if stack and stack[-1][1] == depth:
                start, _ = stack.pop()
                spans.append((start, i))
            depth -= 1
    return spans


def inline_depth(spans, pos):
    return sum(1 for s, e in spans if s < pos < e)


def main(argv):
    show_edges = "--edges" in argv
    allowed = {argv[i + 1] for i, a in enumerate(argv) if a == "--allow" and i + 1 < len(argv)}
    files = sorted(SRC.rglob("*.rs"))
    mod_file = {module_of(f): f for f in files}
    code = {f: strip(f.read_text()) for f in files}

    # Raw imports: (file, absolute path segments, is_pub_use, line).
    raw = []
    reexports = {}  # (module, name) -> absolute path segments
    for f in files:
        c, me = code[f], module_of(f)
        spans = scopes(c)
        used = []
        for m in USE.finditer(c):
            # Aliases (`x as y`) name the same module.
            for p in expand(re.sub(r"\s+as\s+\w+", "", m.group(2))):
                used.append((m.start(2), p, bool(m.group(1))))
        use_spans = [(m.start(), m.end()) for m in USE.finditer(c)]
        for m in INLINE.finditer(c):
            if not any(s <= m.start() < e for s, e in use_spans):
                used.append((m.start(), m.group(1) + m.group(2), False))
        for pos, p, is_pub in used:
            segs = [s for s in p.split("::") if s]
            if not segs:
                continue
            if segs[0] not in ("crate", "super", "self"):
                # `use child::x` names a submodule of this module; other roots are crates.
                if tuple(me) + (segs[0],) not in mod_file or inline_depth(spans, pos):
                    continue
                segs = ["self"] + segs
            # The module the path is relative to: the file's, or an inline module in it.
            base = list(me) + ["<inline>"] * inline_depth(spans, pos)
            if segs[0] == "crate":
                absolute = segs[1:]
            elif segs[0] == "self":
                absolute = base + segs[1:]
            else:
                here = base
                while segs and segs[0] == "super":
                    here = here[:-1]
                    segs = segs[1:]
                absolute = here + segs
            if "<inline>" in absolute:
                continue  # inside the file itself
            line = c.count("\n", 0, pos) + 1
            raw.append((f, absolute, is_pub, line))
            if is_pub and absolute and absolute[-1] not in ("*", "self"):
                reexports[(me, absolute[-1])] = absolute

    def resolve(segs, seen=()):
        """The file that defines what `segs` names."""
        segs = [s for s in segs if s != "self"]
        mod = ()
        for i, s in enumerate(segs):
            if tuple(list(mod) + [s]) in mod_file:
                mod = tuple(list(mod) + [s])
                continue
            key = (mod, s)
            if key in reexports and key not in seen:
                return resolve(reexports[key], seen + (key,))
            break
        return mod_file.get(mod)

    edges = {}
    for f, absolute, _, line in raw:
        t = resolve(absolute)
        if t is None or t == f:
            continue
        edges.setdefault((f, t), line)

    rel = lambda p: p.relative_to(ROOT).as_posix()
    if show_edges:
        for (a, b), line in sorted(edges.items(), key=lambda e: (rel(e[0][0]), rel(e[0][1]))):
            print(f"edge {rel(a)}:{line} -> {rel(b)}")

    failures = 0

    def verdict(files_involved):
        return "allowed" if any(rel(x) in allowed for x in files_involved) else "VIOLATION"

    # (a) imports that run back up the layers.
    def top(f):
        m = module_of(f)
        return m[0] if m else "crate"

    for (a, b), line in sorted(edges.items(), key=lambda e: (rel(e[0][0]), e[1])):
        ta, tb = top(a), top(b)
        for t in (ta, tb):
            if t not in RANK:
                print(f"unknown top-level module `{t}`: add it to LAYERS in {rel(Path(__file__))}")
                failures += 1
                RANK[t] = len(LAYERS)
        if RANK[ta] < RANK[tb]:
            v = verdict([a, b])
            failures += v == "VIOLATION"
            print(f"{v} back up: {rel(a)}:{line} ({ta}) imports {rel(b)} ({tb}), a higher layer")

    # (b) cycles across folders: strongly connected components (Tarjan).
    graph = {f: [] for f in files}
    for a, b in edges:
        graph[a].append(b)
    index, low, stack, on, comps = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            comps.append(comp)

    sys.setrecursionlimit(10000)
    for f in files:
        if f not in index:
            visit(f)
    for comp in comps:
        if len(comp) < 2:
            continue
        folders = sorted({folder_of(f) for f in comp})
        names = ", ".join(sorted(rel(f) for f in comp))
        if len(folders) > 1:
            inside = [(a, b) for (a, b) in edges if a in comp and b in comp]
            # Only the edges between folders can be what makes the cycle span them.
            cross = [(a, b) for a, b in inside if folder_of(a) != folder_of(b)]
            v = verdict([x for e in cross for x in e])
            failures += v == "VIOLATION"
            print(f"{v} cycle over {len(folders)} folders ({', '.join(folders)}): {names}")
            for a, b in sorted(cross, key=lambda e: (rel(e[0]), rel(e[1]))):
                print(f"    {rel(a)}:{edges[(a, b)]} -> {rel(b)}")
        else:
            print(f"note: cycle within {folders[0]}: {names}")

    print(f"{len(files)} files, {len(edges)} imports, {failures} violation(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
