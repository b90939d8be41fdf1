"""Prints kiln ÷ torch for each benchmark line pair in a <name>.jsonl that
tools/gpu-check.sh assembles (kiln's JSON lines, then torch's, measured in the same run).

Lines are paired by shape (every key the two share except the figures, the device and
the implementation's own labels); each figure both carry is divided, and whether higher
is better is said with it. Usage: python3 bench/gpu/ratios.py attention.jsonl [...]"""
import json
import sys

# figure: True when higher is better
FIGURES = {"fwd_bwd_tflops": True, "fwd_ms": False, "bwd_ms": False, "adamw_gbps": True,
           "fraction_of_copy": True, "step_ms": False, "fwd_bwd_ms": False, "extra_mb": False}
LABELS = {"impl", "kernels", "device", "torch", "copy_gbps", "extra_mb_counted"}


def shape_of(line):
    return tuple(sorted((k, v) for k, v in line.items() if k not in FIGURES and k not in LABELS))


def main(paths):
    for path in paths:
        try:
            lines = [json.loads(x) for x in open(path) if x.strip().startswith("{")]
        except (OSError, ValueError) as e:
            print(f"{path}: unreadable ({e})")
            continue
        peers = {shape_of(x): x for x in lines if x.get("impl") == "torch"}
        for ours in (x for x in lines if x.get("impl") == "kiln"):
            peer = peers.get(shape_of(ours))
            label = ", ".join(f"{k}={v}" for k, v in shape_of(ours))
            if ours.get("kernels"):
                label += f" [{ours['kernels']}]"
            if peer is None:
                print(f"{path}: {label}: no torch line for this shape")
                continue
            for fig, higher in FIGURES.items():
                if fig in ours and fig in peer and peer[fig]:
                    r = ours[fig] / peer[fig]
                    print(f"{path}: {label}: {fig} kiln {ours[fig]} / torch {peer[fig]} = {r:.3f}x "
                          f"({'higher' if higher else 'lower'} is better)")


if __name__ == "__main__":
    main(sys.argv[1:])
