#!/usr/bin/env python3
"""Regenerates the Hugging Face tokenizer.json fixtures that tests/text/test_tokenizers.cpp loads.

usage: bench/.venv/bin/python tests/data/tokenizers/make_fixture.py   (needs `pip install tokenizers`)

Writes, next to this script:
  hf_bpe_small.json         a byte-level BPE trained by the `tokenizers` package on the corpus
                            below, saved as the package saves it (merges as [a, b] pairs)
  hf_bpe_small_legacy.json  the same model with merges spelled as "a b" strings (what
                            tokenizers < 0.20 wrote), add_prefix_space on and the
                            pre-tokenizer wrapped in a Sequence
  hf_bpe_small_expected.json  for each file, the ids the package gives for a few strings
"""
import json
import os

import tokenizers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

here = os.path.dirname(os.path.abspath(__file__))

corpus = [
    "The quick brown fox jumps over the lazy dog. The dog didn't care; the fox did.",
    "It's 2024 and we'll train 12 models, they've said, I'm sure you'd agree.",
    "Tokenizers split text into words, numbers and punctuation!!! Then merge bytes.",
    "    indented code\n\tand tabs\n\n  double  spaces   here",
    "naïve café déjà vu — Ünïcödé wörds and 数字 ١٢٣ and emoji 🙂🙂",
    "<|endoftext|>A document boundary.<|endoftext|>Another one, the end.",
] * 20

strings = [
    "The quick brown fox didn't jump.",
    "  two spaces,\tthen a tab\nand a newline   ",
    "It's 2024: 3.14159 and 1,000,000!",
    "café — naïve ünïcödé 数字 🙂",
    "hello<|endoftext|>world <|endoftext|> again",
    "'s 're 'S ''ll x'd",
    "",
]


def build():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=420,
        min_frequency=2,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    return tok


def main():
    tok = build()
    path = os.path.join(here, "hf_bpe_small.json")
    tok.save(path, pretty=True)

    legacy = json.load(open(path, encoding="utf-8"))
    merges = legacy["model"]["merges"]
    if merges and isinstance(merges[0], list):
        legacy["model"]["merges"] = [a + " " + b for a, b in merges]
    byte_level = dict(legacy["pre_tokenizer"])
    byte_level["add_prefix_space"] = True
    legacy["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [byte_level]}
    legacy_path = os.path.join(here, "hf_bpe_small_legacy.json")
    with open(legacy_path, "w", encoding="utf-8") as f:
        json.dump(legacy, f, ensure_ascii=False, indent=2)

    expected = {"tokenizers_version": tokenizers.__version__, "files": {}}
    for name in ["hf_bpe_small.json", "hf_bpe_small_legacy.json"]:
        t = Tokenizer.from_file(os.path.join(here, name))
        cases = []
        for s in strings:
            ids = t.encode(s).ids
            assert t.decode(ids, skip_special_tokens=False) == s or name.endswith("legacy.json"), (s, ids)
            cases.append({"text": s, "ids": ids})
        expected["files"][name] = cases
    with open(os.path.join(here, "hf_bpe_small_expected.json"), "w", encoding="utf-8") as f:
        json.dump(expected, f, ensure_ascii=False, indent=1)
    print("wrote fixtures with tokenizers", tokenizers.__version__)


if __name__ == "__main__":
    main()
