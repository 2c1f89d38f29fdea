"""Shared benchmark plumbing: interleaved timing, machine info, result files, ResNet-18's convs.

Used by the suite (``dcgraph bench``) and by the question-per-script benchmarks in the source
checkout's ``benchmarks/``. Results go to :func:`results_dir` (``dcgraph bench --out DIR``;
the checkout's scripts write ``benchmarks/results``, the committed results).
"""

from __future__ import annotations

import json
import os
import platform
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

_RESULTS = [Path("bench-results")]


def results_dir() -> Path:
    """Where result files go now (default ``./bench-results``)."""
    return _RESULTS[0]


def use_results_dir(path: str | Path) -> Path:
    """Write result files under ``path`` from now on (created on the first write)."""
    _RESULTS[0] = Path(path)
    return _RESULTS[0]

# (name, C_in, C_out, input H=W, kernel, stride): the distinct convolutions of ResNet-18 (224 px)
RESNET18 = [
    ("conv1", 3, 64, 224, 7, 2),
    ("layer1", 64, 64, 56, 3, 1),
    ("layer2.down", 64, 128, 56, 3, 2),
    ("layer2", 128, 128, 28, 3, 1),
    ("layer2.1x1", 64, 128, 56, 1, 2),
    ("layer3.down", 128, 256, 28, 3, 2),
    ("layer3", 256, 256, 14, 3, 1),
    ("layer4.down", 256, 512, 14, 3, 2),
    ("layer4", 512, 512, 7, 3, 1),
]


def time_interleaved(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 3,
                     shuffle: bool = False) -> dict[str, dict[str, float]]:
    """Median, inter-quartile range and minimum (ms) of each function, run round-robin so
    that machine drift (other tenants on these shared cores) hits every variant alike.

    The median is what a user sees; the minimum is the least noisy estimate of the work
    itself, so ratios are reported on both. ``shuffle``: a new order every round (seeded), for
    rows whose position matters (a runtime's threads still spinning from the previous row)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    rng = random.Random(0)
    names = list(fns)
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        if shuffle:
            rng.shuffle(names)
        for name in names:
            t0 = time.perf_counter()
            fns[name]()
            samples[name].append(1e3 * (time.perf_counter() - t0))
    out = {}
    for name, s in samples.items():
        q = statistics.quantiles(s, n=4) if len(s) >= 4 else [min(s), 0, max(s)]
        out[name] = {"median_ms": statistics.median(s), "iqr_ms": q[2] - q[0], "min_ms": min(s)}
    return out


def machine_info() -> dict:
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "unset (torch's threads spin)"),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def write_results(stem: str, data: dict, markdown: str) -> tuple[Path, Path]:
    """Write ``<results dir>/<stem>.json`` and ``<stem>.md`` atomically."""
    out = results_dir()
    out.mkdir(parents=True, exist_ok=True)
    paths = (out / f"{stem}.json", out / f"{stem}.md")
    for path, text in zip(paths, (json.dumps(data, indent=2), markdown), strict=True):
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(text + "\n")
        tmp.replace(path)
    return paths


def geomean(values: list[float]) -> float:
    return statistics.geometric_mean(values) if values else float("nan")
