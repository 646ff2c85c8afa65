"""Shared timing and reporting for the ratio benchmarks: every ratio is measured side by side in one run."""

from __future__ import annotations

import platform
import statistics
import sys
import time
from typing import Callable

import torch


def interleaved_samples(fns: dict[str, Callable[[], object]], repeats: int = 7, warmup: int = 1
                        ) -> dict[str, list[float]]:
    """Wall times (s) of several functions measured round-robin, one per round, so drift on the machine hits all
    alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return samples


def interleaved_times(fns: dict[str, Callable[[], object]], repeats: int = 7, warmup: int = 1) -> dict[str, float]:
    """Median times of `interleaved_samples`."""
    return {name: statistics.median(ts) for name, ts in interleaved_samples(fns, repeats, warmup).items()}


def median_ratio(samples: dict[str, list[float]], numerator: str, denominator: str) -> float:
    """Median over rounds of time(numerator) / time(denominator): robust to a slow round hitting one side."""
    return statistics.median(a / b for a, b in zip(samples[numerator], samples[denominator]))


def machine_line() -> str:
    import nnsight
    import transformers

    return (f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, python "
            f"{sys.version.split()[0]}, torch {torch.__version__}, transformers {transformers.__version__}, "
            f"nnsight {nnsight.__version__}")


def markdown_table(header: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
