#!/bin/sh
# usage: st_python_check.sh FIXTURE_BINARY SOURCE_ROOT
# Hugging Face's `safetensors` package reads what kiln writes, and kiln reads what the
# package writes (numpy flavour; every dtype both sides know). Skips (exit 77) when no
# Python with safetensors + numpy is found: $KILN_PYTHON, SOURCE_ROOT/bench/.venv/bin/python,
# python3.
set -eu
fixture="$1"; root="$2"
. "$(dirname "$0")/../python_or_skip.sh"
python_or_skip "$root" "import safetensors.numpy, numpy" "the safetensors and numpy packages"
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
"$fixture" write "$dir/kiln.safetensors"
"$py" - "$dir" "$fixture" <<'PY'
import subprocess, sys
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

d, fixture = sys.argv[1], sys.argv[2]
# 1. Python reads kiln's file.
# numpy has no bfloat16: that tensor is checked through its raw bits below.
with safe_open(f"{d}/kiln.safetensors", "np") as f:
    meta = f.metadata()
    keys = sorted(f.keys())
    t = {k: f.get_tensor(k) for k in keys if k != "bf16"}
assert keys == sorted(["f32", "f64", "bf16", "f16", "i64", "i32", "u8", "nested.name.weight", "empty"]), keys
assert meta == {"format": "pt", "writer": "kiln"}, meta
assert t["f32"].dtype == np.float32 and t["f32"].shape == (2, 3)
assert t["f32"].tolist() == [[0.5, -1.25, 3.0], [np.float32(1e-3).item(), 7.0, -0.0]], t["f32"]
assert t["f64"].tolist() == [1.0 / 3.0, -2.5, 1e100, 0.0]
assert t["f16"].dtype == np.float16 and t["f16"].tolist() == [[0.5, 1.0], [-3.0, 65504.0]]
assert t["i64"].tolist() == [-1, 2, 1 << 50] and t["i32"].tolist() == [7, -9]
assert t["u8"].dtype == np.uint8 and t["u8"].tolist() == [0, 1, 2, 254, 255]
assert t["nested.name.weight"].shape == (1, 1, 1) and t["empty"].shape == (0, 4)
# bfloat16 has no numpy dtype: check its raw bits through the byte view.
with open(f"{d}/kiln.safetensors", "rb") as fh:
    raw = fh.read()
import json, struct
n = struct.unpack("<Q", raw[:8])[0]
h = json.loads(raw[8:8 + n])
b, e = h["bf16"]["data_offsets"]
bits = np.frombuffer(raw[8 + n + b: 8 + n + e], dtype=np.uint16)
assert [np.frombuffer((x.astype(np.uint32) << 16).tobytes(), np.float32)[0] for x in bits] == [1.5, -2.0, 0.25]
import safetensors
print("safetensors", safetensors.__version__, "(Python) read", len(keys), "tensors written by kiln: ok")

# 2. kiln reads Python's file.
ours = {
    "a.f32": np.arange(12, dtype=np.float32).reshape(3, 4) / 7,
    "b.f64": np.array([1e-300, -2.0, 3.5]),
    "c.f16": np.array([[1, 2], [3, 4]], dtype=np.float16),
    "d.i64": np.array([5, -6], dtype=np.int64),
    "e.i32": np.array([1 << 30], dtype=np.int32),
    "f.u8": np.array([9, 8, 7], dtype=np.uint8),
    "g.empty": np.zeros((2, 0), dtype=np.float32),
}
save_file(ours, f"{d}/py.safetensors", metadata={"format": "np", "from": "python"})
out = subprocess.run([fixture, "read", f"{d}/py.safetensors"], check=True, capture_output=True, text=True).stdout
lines = out.strip().splitlines()
names = {"float32": "F32", "float64": "F64", "float16": "F16", "int64": "I64", "int32": "I32", "uint8": "U8"}
expect = []
for k in sorted(ours):
    v = ours[k]
    shape = "[" + ", ".join(str(s) for s in v.shape) + "]"
    expect.append((k, names[str(v.dtype)], shape, float(v.astype(np.float64).sum())))
got = [l.split(" ", 3) for l in lines if not l.startswith("meta ")]
assert len(got) == len(expect), (got, expect)
for (k, dt, sh, s), g in zip(expect, got):
    assert g[0] == k and g[1] == dt, (g, k, dt)
    rest = g[2] + " " + g[3]
    gshape, gsum = rest.rsplit(" ", 1)
    assert gshape == sh, (k, gshape, sh)
    assert abs(float(gsum) - s) <= 1e-12 * max(1.0, abs(s)), (k, gsum, s)
assert "meta from=python" in lines and "meta format=np" in lines, lines
print("kiln read", len(got), "tensors written by safetensors (Python): ok")
PY
