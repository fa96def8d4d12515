"""The measuring primitives of the benchmark: interleaved timing, ratios, log-log exponents, and
the process's resident memory (current, peak, peak reset).

Timing interleaves the variants (A B C A B C ...) in one process: on a shared machine the load
changes from minute to minute, so only figures taken side by side are comparable, and a variant
measured last must not be the one that met the busiest minute. The first round is a warm-up
(allocator, lazy optimizer state, kernels' first call) and is discarded; a variant's figure is the
median of the remaining rounds.

Memory on CPU is the resident set. Its peak (VmHWM) is monotone over a process's life, so every
variant is measured in a fresh subprocess; between shapes the peak is reset
(`/proc/self/clear_refs`, Linux >= 4.0) after freed heap memory is returned to the OS
(`malloc_trim`), so each shape's peak is its own.
"""

from __future__ import annotations

import ctypes
import gc
import math
import statistics
import time
from collections.abc import Callable
from pathlib import Path


def interleave(cases: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each case, measured in rounds A B C A B C ...; warm-up rounds dropped."""
    import torch

    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)  # GPU work is async
    times: dict[str, list[float]] = {name: [] for name in cases}
    for round_ in range(warmup + repeats):
        for name, fn in cases.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            elapsed = time.perf_counter() - t0
            if round_ >= warmup:
                times[name].append(elapsed)
    return times


def summarise(times: dict[str, list[float]], reference: str | None) -> dict[str, dict]:
    """Median, spread and ratio to the reference's median of each case's timings."""
    out = {}
    for name, ts in times.items():
        out[name] = {"median_s": statistics.median(ts), "min_s": min(ts), "max_s": max(ts), "repeats": len(ts)}
    if reference is not None:
        ref = out[reference]["median_s"]
        for row in out.values():
            row["ratio"] = row["median_s"] / ref
    return out


def fit_exponent(xs: list[float], ys: list[float]) -> float:
    """b in y = a x^b, least squares in log-log (0: flat, 1: linear, 2: quadratic)."""
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    var = sum((x - mx) ** 2 for x in lx)
    return sum((x - mx) * (y - my) for x, y in zip(lx, ly)) / var if var else 0.0


# ----------------------------------------------------------------------------- memory


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def rss_mb() -> float:
    """The resident set now."""
    return _status_mb("VmRSS")


def peak_rss_mb() -> float:
    """The resident set's peak since the process started or `reset_peak` last ran."""
    return _status_mb("VmHWM")


def reset_peak() -> None:
    """Give freed heap back to the OS, then start the peak afresh from the current resident set."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc: the peak may include freed memory the allocator kept
        pass
    Path("/proc/self/clear_refs").write_text("5")
