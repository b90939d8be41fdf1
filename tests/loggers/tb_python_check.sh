#!/bin/sh
# usage: tb_python_check.sh FIXTURE_BINARY SOURCE_ROOT
# Writes an event file with kiln and reads it back with TensorBoard's EventAccumulator.
# Skips (exit 77) when no Python with the `tensorboard` package is found: $KILN_PYTHON,
# SOURCE_ROOT/bench/.venv/bin/python (bench/setup_venv.sh installs it), python3.
set -eu
fixture="$1"; root="$2"
. "$(dirname "$0")/../python_or_skip.sh"
python_or_skip "$root" "import tensorboard.backend.event_processing.event_accumulator" "the tensorboard package"
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
"$fixture" "$dir" >/dev/null
"$py" - "$dir" <<'PY'
import sys
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
acc = EventAccumulator(sys.argv[1])
acc.Reload()
tags = acc.Tags()["scalars"]
assert sorted(tags) == ["train/loss", "val/acc"], tags
loss = acc.Scalars("train/loss")
assert [e.step for e in loss] == list(range(10)), [e.step for e in loss]
for e in loss:
    assert abs(e.value - 1.0 / (e.step + 1)) < 1e-6, (e.step, e.value)
val = acc.Scalars("val/acc")
assert len(val) == 1 and val[0].step == 9 and abs(val[0].value - 0.875) < 1e-7
print("tensorboard read", len(loss) + len(val), "scalars written by kiln: ok")
PY
