"""What the GPU benchmarks' PyTorch peers share: milliseconds per call from CUDA events."""
import torch


def time_ms(f, reps=20):
    """Milliseconds per call of f over reps calls, after one warm-up call."""
    f()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(reps):
        f()
    b.record()
    b.synchronize()
    return a.elapsed_time(b) / reps
