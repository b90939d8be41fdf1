#!/bin/sh
# usage: tok_python_check.sh FIXTURE_BINARY SOURCE_ROOT
# Hugging Face's `tokenizers` package loads the tokenizer.json kiln saves (both merge
# spellings) and encodes to the same ids as kiln; kiln loads a tokenizer the package trained
# and encodes to the same ids as the package. Skips (exit 77) when no Python with
# `tokenizers` is found: $KILN_PYTHON, SOURCE_ROOT/bench/.venv/bin/python, python3.
set -eu
fixture="$1"; root="$2"
. "$(dirname "$0")/../python_or_skip.sh"
python_or_skip "$root" "import tokenizers" "the tokenizers package"
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
"$py" - "$dir" "$fixture" <<'PY'
import json, subprocess, sys
import tokenizers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

d, fixture = sys.argv[1], sys.argv[2]
lines = [
    "The quick brown fox jumps over the lazy dog; it's the dog's day, isn't it?",
    "In 2024 we trained 12 models on 3.5 GB of text, they'd say. We'll see!",
    "naïve café déjà vu — “quoted” ‘text’ Ünïcödé wörds, 数字 and ١٢٣, emoji 🙂🙂",
    "    indented code(x) { return y[0] + 1; }\n\tand tabs\n\n  double  spaces   ",
    "<|endoftext|>A new document<|endoftext|>and another one.",
]
corpus = "\n".join(lines * 40)
with open(f"{d}/corpus.txt", "w", encoding="utf-8") as f:
    f.write(corpus)
texts = lines + [
    "", " ", "\n\n\n", "hello<|endoftext|>world <|endoftext|> again",
    "UPPER lower MiXeD 's 'S ''ll x'd", "tabs\tand\u00a0no-break\u3000spaces",
    "unseen: Ω≈ç√∫ 日本語 🚀 \u0301combining", "a" * 300, "    \n    x",
]
with open(f"{d}/texts.json", "w", encoding="utf-8") as f:
    json.dump(texts, f, ensure_ascii=False)

def kiln_ids(tok_path):
    out = subprocess.run([fixture, "encode", tok_path, f"{d}/texts.json"], check=True,
                         capture_output=True, text=True).stdout
    rows = out.split("\n")[: len(texts)]
    return [[int(x) for x in r.split()] for r in rows]

# 1. The package loads kiln's tokenizer.json and encodes identically.
subprocess.run([fixture, "train", f"{d}/corpus.txt", "600", f"{d}/kiln.json"], check=True)
for name in ["kiln.json", "kiln.json.pairs.json"]:
    tok = Tokenizer.from_file(f"{d}/{name}")
    assert 300 < tok.get_vocab_size() <= 600, tok.get_vocab_size()
    ours = kiln_ids(f"{d}/{name}")
    for s, mine in zip(texts, ours):
        theirs = tok.encode(s).ids
        assert theirs == mine, (name, s, theirs, mine)
        assert tok.decode(theirs, skip_special_tokens=False) == s, (name, s)
print("tokenizers", tokenizers.__version__, "(Python) encodes", len(texts), "strings like kiln with kiln's tokenizer.json: ok")

# 2. kiln loads a tokenizer the package trained and encodes identically.
for prefix in [False, True]:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=prefix)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=700, min_frequency=2, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(lines * 40, trainer=trainer)
    path = f"{d}/py_{prefix}.json"
    tok.save(path)
    ours = kiln_ids(path)
    for s, mine in zip(texts, ours):
        theirs = tok.encode(s).ids
        assert theirs == mine, (path, s, theirs, mine)
print("kiln encodes", len(texts), "strings like tokenizers (Python) with the package's tokenizer.json: ok")
PY
