#!/usr/bin/env python3
"""Compiles every C++ code block of the given markdown files, so the docs cannot rot.

Usage: check_code_blocks.py [--cxx CXX] [--root DIR] [--show] FILE.md... [-- EXTRA_FLAGS...]
       check_code_blocks.py --list [--root DIR] [FILE.md...]
           (prints the files that hold C++ blocks; by default among README.md, docs/*.md)

Every fenced block whose info string is cpp (or c++, cxx) is compiled on its own with
`CXX -std=c++20 -fsyntax-only -fopenmp -I<root>/include -I/usr/include/eigen3` (plus
mpi.h's and cuda_runtime.h's folders where this machine has them). No block is exempt
by accident:

* A block without a directive must be a complete translation unit and compiles as is.
* A fragment is preceded by an HTML comment, which the rendered page does not show:

      <!-- compile: prelude=NAME
      hidden lines: what the fragment assumes (#include lines, `extern T x;` ...)
      -->

  NAME is one of PRELUDES below: an umbrella header, types some fragments assume, and
  whether the block's lines sit at namespace scope or inside a function body. The
  source is: the umbrella header, the prelude's types, the hidden lines (at namespace
  scope), then the block. When the block or its hidden lines include headers, the
  umbrella is left out, so the compile stays light and the block has to include what
  it uses as a reader's program would (a block's own #include lines move to the top
  when its lines go into a function body).
* A block that is not C++ a compiler can check is preceded by
  `<!-- compile: skip reason="..." -->`; every skip is printed with its reason.

Only blank lines may separate a directive from its block; a directive that is not
followed by a C++ block is an error. Errors point at the markdown file and line (the
generated source carries #line directives). Per file the script prints "N blocks
compiled, M skipped" and exits 1 at the first failing block, naming file:line and the
compiler's message. A block that needs a system header this machine lacks (nccl.h on a
machine without CUDA) is named as not checked, and the file's exit status is then 77
(skipped) unless a block failed.
"""

import argparse
import glob
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile

# The types the trainer's fragments assume: `classifier` (the README's module) and
# `fashion_mnist_data` (a datamodule of Fashion-MNIST loaders). Objects of them, where a
# fragment uses some, are declared in its hidden lines (`extern classifier model;`).
TRAINER_CONTEXT = r"""
#include <kiln/data/data_loader.hpp>
#include <kiln/data/dataset.hpp>
#include <kiln/nn/mlp.hpp>
#include <kiln/ops.hpp>
#include <kiln/optim/adamw.hpp>
#include <kiln/train/trainer.hpp>
struct classifier {
  kiln::nn::mlp<kiln::nn::relu> net{784, {256, 256}, 10};
  template <class F> void for_each_child(F&& f) { f("net", net); }
  kiln::var<float> training_step(auto& ctx, const kiln::data::labelled_batch& b) {
    auto loss = kiln::cross_entropy(net(kiln::var<float>(b.x)), b.y);
    ctx.log("train/loss", loss);
    return loss;
  }
  void validation_step(auto& ctx, const kiln::data::labelled_batch& b) {
    auto logits = net(kiln::var<float>(b.x));
    ctx.log("val/loss", kiln::cross_entropy(logits, b.y));
    ctx.log("val/acc", kiln::accuracy(logits, b.y));
  }
  void test_step(auto& ctx, const kiln::data::labelled_batch& b) { validation_step(ctx, b); }
  auto configure_optimizers() { return kiln::optim::adamw<float>(*this, {.lr = 2e-3}); }
};
struct fashion_mnist_data {
  using loader = kiln::data::data_loader<kiln::data::tensor_dataset>;
  loader& train_loader();
  loader& val_loader();
  loader& test_loader();
};
"""

# name -> (umbrella header, context code, lines inside a function body?)
PRELUDES = {
    "kiln": ("kiln/kiln.hpp", "", False),  # the foundation's umbrella, namespace scope
    "body": ("kiln/kiln.hpp", "", True),  # the same, the lines wrapped in a function body
    "train": ("kiln/train.hpp", TRAINER_CONTEXT, False),  # + trainer, callbacks, loggers,
    "train-body": ("kiln/train.hpp", TRAINER_CONTEXT, True),  # and the types above
}

FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([^\s`]*)")
DIRECTIVE = re.compile(r"^\s*<!--\s*compile:\s*(.*?)\s*(-->)?\s*$")
INCLUDE = re.compile(r"^\s*#\s*include\b")
CPP_LANGS = {"cpp", "c++", "cxx"}


class DocError(Exception):
    pass


class Block:
    def __init__(self, path, line, code, directive, hidden, hidden_line):
        self.path = path  # markdown file
        self.line = line  # 1-based line of the opening fence
        self.code = code  # list of lines
        self.directive = directive  # dict or None
        self.hidden = hidden  # list of hidden lines from the directive comment
        self.hidden_line = hidden_line  # 1-based line of the first hidden line


def parse_directive(text, where):
    """'prelude=body' / 'skip reason="..."' -> dict."""
    out = {}
    for m in re.finditer(r'(\w[\w-]*)(?:=("([^"]*)"|\S+))?', text):
        key, raw, quoted = m.group(1), m.group(2), m.group(3)
        out[key] = quoted if quoted is not None else (raw if raw is not None else True)
    if "skip" in out:
        if not isinstance(out.get("reason"), str) or not out["reason"].strip():
            raise DocError(f'{where}: a skip needs a reason: <!-- compile: skip reason="..." -->')
    elif "prelude" in out:
        if out["prelude"] not in PRELUDES:
            raise DocError(f"{where}: unknown prelude '{out['prelude']}' (known: {', '.join(PRELUDES)})")
    else:
        raise DocError(f'{where}: expected prelude=NAME or skip reason="..." after "compile:"')
    unknown = set(out) - {"skip", "reason", "prelude"}
    if unknown:
        raise DocError(f"{where}: unknown key(s) {', '.join(sorted(unknown))} in the compile directive")
    return out


def extract(path):
    """Every C++ block of a markdown file, with the directive in front of it."""
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    blocks = []
    pending = None  # (directive, hidden lines, first hidden line, directive line)
    i = 0
    while i < len(lines):
        line = lines[i]
        d = DIRECTIVE.match(line)
        if d:
            if pending:
                raise DocError(f"{path}:{pending[3]}: compile directive not followed by a C++ block")
            where = f"{path}:{i + 1}"
            directive = parse_directive(d.group(1), where)
            hidden, first = [], i + 2
            if not d.group(2):  # the comment goes on: hidden lines up to -->
                i += 1
                while i < len(lines) and "-->" not in lines[i]:
                    hidden.append(lines[i])
                    i += 1
                if i == len(lines):
                    raise DocError(f"{where}: compile directive without a closing -->")
                if lines[i].strip() != "-->":
                    raise DocError(f"{path}:{i + 1}: put the closing --> of a compile directive on its own line")
            pending = (directive, hidden, first, where.rsplit(":", 1)[1])
            i += 1
            continue
        m = FENCE.match(line)
        if m:
            indent, fence, lang = m.group(1), m.group(2), m.group(3).lower()
            start = i
            i += 1
            body = []
            while i < len(lines) and not lines[i].strip().startswith(fence):
                body.append(lines[i][len(indent):] if lines[i].startswith(indent) else lines[i].lstrip())
                i += 1
            if i == len(lines):
                raise DocError(f"{path}:{start + 1}: code block never closed")
            if lang in CPP_LANGS:
                directive, hidden, first = pending[:3] if pending else (None, [], 0)
                blocks.append(Block(path, start + 1, body, directive, hidden, first))
            elif pending:
                raise DocError(f"{path}:{pending[3]}: compile directive in front of a '{lang or 'plain'}' block")
            pending = None
            i += 1
            continue
        if pending and line.strip():
            raise DocError(f"{path}:{pending[3]}: compile directive not followed by a C++ block")
        i += 1
    if pending:
        raise DocError(f"{path}:{pending[3]}: compile directive not followed by a C++ block")
    return blocks


def translation_unit(block):
    """The source the compiler sees, with #line directives back into the markdown."""
    src_path = block.path.replace("\\", "\\\\").replace('"', '\\"')
    first = block.line + 1  # the block's first line
    includes = [(n, l) for n, l in enumerate(block.code) if INCLUDE.match(l)]
    prelude = (block.directive or {}).get("prelude")
    header, context, in_function = PRELUDES[prelude] if prelude else (None, "", False)
    out = []
    if header and not includes and not any(INCLUDE.match(l) for l in block.hidden):
        out.append(f"#include <{header}>")
    if in_function:  # the block's own includes first, then everything else in the body
        for n, l in includes:
            out += [f'#line {first + n} "{src_path}"', l]
    if context:
        out += ['#line 1 "<prelude ' + prelude + '>"', context.strip("\n")]
    if block.hidden:
        out.append(f'#line {block.hidden_line} "{src_path}"')
        out += block.hidden
    if in_function:
        out.append("void kiln_doc_block_body() {")
        skip = {n for n, _ in includes}
        for n, l in enumerate(block.code):
            out += [f'#line {first + n} "{src_path}"', "" if n in skip else l]
        out.append("}")
    else:
        out.append(f'#line {first} "{src_path}"')
        out += block.code
    return "\n".join(out) + "\n"


def machine_flags():
    """Include paths for the system headers some kiln headers need (mpi.h, cuda_runtime.h)."""
    flags = []
    mpicxx = shutil.which("mpicxx")
    if mpicxx:
        r = subprocess.run([mpicxx, "--showme:compile"], capture_output=True, text=True)
        if r.returncode == 0:
            flags += shlex.split(r.stdout)
    nvcc = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    cuda_include = os.path.join(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))), "include")
    if os.path.isfile(os.path.join(cuda_include, "cuda_runtime.h")):
        flags.append("-I" + cuda_include)
    return flags


# A system header (not one of kiln's) that this machine does not have: the block cannot be
# checked here, which is reported, never passed over.
MISSING_SYSTEM_HEADER = re.compile(r"fatal error: ((?!kiln/)[\w./+-]+): No such file or directory")


def compile_block(block, cxx, flags):
    with tempfile.NamedTemporaryFile("w", suffix=".cpp", prefix="kiln_doc_", delete=False) as f:
        f.write(translation_unit(block))
        tmp = f.name
    try:
        cmd = cxx + ["-std=c++20", "-fsyntax-only", "-fopenmp"] + flags + [tmp]
        r = subprocess.run(cmd, capture_output=True, text=True)
        return r.returncode, r.stdout + r.stderr
    finally:
        os.unlink(tmp)


def check_file(path, cxx, flags, show):
    """0: every block compiled or was skipped by a directive; 1: a block failed; 77: a
    block needs a system header this machine lacks (and none failed)."""
    blocks = extract(path)
    compiled = skipped = 0
    missing = []
    for b in blocks:
        if b.directive and "skip" in b.directive:
            print(f"{path}:{b.line}: skipped: {b.directive['reason']}")
            skipped += 1
            continue
        if show:
            print(f"--- {path}:{b.line}\n{translation_unit(b)}")
        rc, message = compile_block(b, cxx, flags)
        if rc != 0:
            m = MISSING_SYSTEM_HEADER.search(message)
            if m:
                print(f"{path}:{b.line}: NOT CHECKED on this machine: it needs <{m.group(1)}>, which is not installed")
                missing.append(b.line)
                continue
            kind = f"prelude={b.directive['prelude']}" if b.directive else "a complete translation unit"
            print(f"{path}:{b.line}: this C++ block does not compile ({kind}):\n{message.rstrip()}")
            if not b.directive:
                print(f"(a fragment needs <!-- compile: prelude=NAME --> in front of it; "
                      f"preludes: {', '.join(PRELUDES)})")
            print(f"{path}: {compiled} blocks compiled, {skipped} skipped, FAILED at {path}:{b.line}")
            return 1
        compiled += 1
    tail = f", {len(missing)} not checked (missing system headers)" if missing else ""
    print(f"{path}: {compiled} blocks compiled, {skipped} skipped{tail}")
    return 77 if missing else 0


def main():
    argv = sys.argv[1:]
    extra = []
    if "--" in argv:
        k = argv.index("--")
        argv, extra = argv[:k], argv[k + 1:]
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("files", nargs="*", help="markdown files (default, with --list: README.md and docs/*.md)")
    ap.add_argument("--cxx", default=os.environ.get("CXX", "c++"), help="C++ compiler (default: $CXX or c++)")
    ap.add_argument("--root", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."),
                    help="repository root (its include/ is on the include path)")
    ap.add_argument("--list", action="store_true", help="print the files that hold C++ blocks, one a line")
    ap.add_argument("--show", action="store_true", help="print each generated translation unit")
    args = ap.parse_args(argv)
    root = os.path.abspath(args.root)
    flags = ["-I" + os.path.join(root, "include"), "-I/usr/include/eigen3"] + machine_flags() + extra
    cxx = shlex.split(args.cxx)
    try:
        if args.list:
            files = args.files or [os.path.join(root, "README.md")] + sorted(
                glob.glob(os.path.join(root, "docs", "*.md")))
            for path in files:
                if extract(path):
                    print(os.path.relpath(path, root) if not args.files else path)
            return 0
        if not args.files:
            ap.error("name the markdown files to check")
        status = 0
        for path in args.files:
            rc = check_file(path, cxx, flags, args.show)
            if rc == 1:
                return 1
            status = status or rc
        return status
    except (DocError, OSError) as e:
        print(f"error: {e}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
