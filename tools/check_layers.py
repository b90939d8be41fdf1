#!/usr/bin/env python3
"""kiln's headers include their own layer and the layers below it, never one above.

The table below is the order (docs/layers.md explains it). Each level holds one layer,
or several peer layers that are independent of one another. A layer claims folders under
include/kiln/ ("core/" claims the headers directly in include/kiln/core/, not those of a
subfolder, which needs a claim of its own) and at most one file beside them: the front
door of one of its folders ("ops.hpp" beside "ops/").

For every header under include/kiln/, every `#include "kiln/..."` (or <kiln/...>, or a
relative include) is resolved and fails the check when it reaches:
  - a higher level ("reaches up"),
  - a peer layer on the same level ("reaches sideways": peers stay independent, so no
    loop can form between them),
  - a header that does not exist,
and a header in a folder that no layer claims fails too. Folders of one layer may include
each other, but not in a loop. Exit status 1 on any failure, each named file:line, the
include, and both layers; 0 with a one-line summary otherwise.

Usage: tools/check_layers.py [--root DIR]   (DIR: the repository, default: this file's ../)
"""

import argparse
import os
import re
import sys

# Bottom up. A level is a list of (layer, claims); claims are space-separated.
LEVELS = [
    [("core", "core/")],  # tensors, dtypes, devices, allocators, RNG, the cpu and cuda runtimes
    [("kernels", "ops/kernel/ ops/cpu/ cuda/")],  # tensor kernels without autograd
    [("autograd", "autograd/")],
    [("ops", "ops/ ops.hpp")],  # differentiable ops, their front door and gradient checker
    [("io", "io/")],  # file formats
    [("nn", "nn/")],
    [("optim", "optim/")],
    [("comm", "comm/"), ("data", "data/"), ("text", "text/"), ("precision", "precision/")],
    [("strategy", "strategy/")],
    [("train", "train/")],
    [("callbacks", "callbacks/"), ("loggers", "loggers/")],
    [("umbrella", "./")],  # kiln/kiln.hpp, kiln/train.hpp
]

INCLUDE = re.compile(r'^\s*#\s*include\s*([<"])([^">]+)[">]')


def build_table():
    """claim → (layer, level index); checks the table's own rules."""
    claims, problems = {}, []
    folders_of = {}
    for level, layers in enumerate(LEVELS):
        for name, spec in layers:
            folders_of[name] = [c for c in spec.split() if c.endswith("/")]
            for c in spec.split():
                if c in claims:
                    problems.append(f"LEVELS: '{c}' is claimed by both {claims[c][0]} and {name}")
                claims[c] = (name, level)
    for c, (name, _) in claims.items():
        if not c.endswith("/") and c[: -len(".hpp")] + "/" not in folders_of[name]:
            problems.append(f"LEVELS: {name} claims the single file '{c}', which is not the front door "
                            f"of one of its folders (a layer is a folder, not a list of files)")
    return claims, problems


def claim_of(rel, claims):
    """The claim that owns header `rel` (relative to include/kiln, '/'-separated), or None."""
    if rel in claims:
        return rel
    folder = os.path.dirname(rel)
    key = (folder + "/") if folder else "./"
    return key if key in claims else None


def find_cycle(graph):
    """A cycle in {node: set(nodes)} as a list of nodes, or None."""
    state, stack = {}, []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    args = ap.parse_args()
    base = os.path.join(os.path.abspath(args.root), "include", "kiln")
    if not os.path.isdir(base):
        print(f"check_layers: {base} is not a directory", file=sys.stderr)
        return 2

    claims, failures = build_table()
    headers = []
    for dirpath, dirnames, files in os.walk(base):
        dirnames.sort()
        for f in sorted(files):
            headers.append(os.path.relpath(os.path.join(dirpath, f), base).replace(os.sep, "/"))

    owner = {}
    for h in headers:
        c = claim_of(h, claims)
        if c is None:
            folder = os.path.dirname(h) or "."
            failures.append(f"include/kiln/{h}: its folder {folder}/ belongs to no layer "
                            f"(add it to LEVELS in tools/check_layers.py)")
        else:
            owner[h] = c

    folder_edges, example = {}, {}
    for h in headers:
        if h not in owner:
            continue
        src_claim = owner[h]
        src_layer, src_level = claims[src_claim]
        path = os.path.join(base, h)
        with open(path, encoding="utf-8", errors="replace") as fh:
            for lineno, line in enumerate(fh, 1):
                m = INCLUDE.match(line)
                if not m:
                    continue
                spelled = m.group(2)
                if spelled.startswith("kiln/"):
                    target = spelled[len("kiln/"):]
                elif m.group(1) == '"' and os.path.exists(os.path.join(os.path.dirname(path), spelled)):
                    target = os.path.relpath(os.path.normpath(os.path.join(os.path.dirname(path), spelled)), base)
                    target = target.replace(os.sep, "/")
                    if target.startswith("../"):
                        continue  # outside kiln: not a layer question
                else:
                    continue  # a system or third-party header
                where = f"include/kiln/{h}:{lineno}: {line.strip()}"
                if target not in owner:
                    if not os.path.exists(os.path.join(base, target)):
                        failures.append(f"{where}: no such header include/kiln/{target}")
                    continue  # an unclaimed target is reported as a header of its own
                dst_claim = owner[target]
                dst_layer, dst_level = claims[dst_claim]
                if dst_level > src_level:
                    failures.append(f"{where}: reaches up from layer {src_layer} (level {src_level}) "
                                    f"to layer {dst_layer} (level {dst_level})")
                elif dst_level == src_level and dst_layer != src_layer:
                    failures.append(f"{where}: reaches sideways from layer {src_layer} to its peer "
                                    f"{dst_layer} (peers on one level do not include each other)")
                elif dst_layer == src_layer and dst_claim != src_claim:
                    folder_edges.setdefault(src_claim, set()).add(dst_claim)
                    example.setdefault((src_claim, dst_claim), f"include/kiln/{h}:{lineno}")

    cycle = find_cycle(folder_edges)
    if cycle:
        layer = claims[cycle[0]][0]
        steps = "; ".join(f"{a} -> {b} ({example[(a, b)]})" for a, b in zip(cycle, cycle[1:]))
        failures.append(f"layer {layer}: its folders include each other in a loop: {steps}")

    if failures:
        for f in failures:
            print(f, file=sys.stderr)
        print(f"kiln layers: {len(failures)} problem(s); the order is in tools/check_layers.py "
              f"and docs/layers.md", file=sys.stderr)
        return 1
    used = {claims[c][0] for c in owner.values()}
    print(f"kiln layers: {len(headers)} headers in {len(used)} layers, no include reaches up")
    return 0


if __name__ == "__main__":
    sys.exit(main())
