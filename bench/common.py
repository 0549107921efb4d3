"""Shared pieces of the benchmarks: reference models and data, timing, CPU/GPU peak memory."""
from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

IMAGE_SIZE = {"tiny": 64, "small": 224, "base": 336}


def timeit(fn, *, repeat: int, warmup: int = 1, sync=None) -> float:
    """Median seconds of `fn()` over `repeat` runs after `warmup` runs."""
    sync = sync or (lambda: None)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def build_model(out: Path, preset: str, *, arch: str = "llava") -> Path:
    """An untrained reference model of `preset` (timing needs the shapes, not the training)."""
    from reference_models.architectures import build_reference_model
    from reference_models.synthetic import vocabulary

    path = out / f"{arch}-{preset}"
    if not (path / "config.json").exists():
        model, proc = build_reference_model(arch=arch, preset=preset, words=vocabulary(), seed=0)
        model.eval().save_pretrained(path)
        proc.save_pretrained(path)
    return path


def build_data(out: Path, preset: str, *, n: int, n_canaries: int = 32) -> Path:
    from reference_models.synthetic import generate

    path = out / f"data-{preset}-{n}"
    if not (path / "manifest.jsonl").exists():
        generate(path, n=n, bias=0.9, seed=0, n_canaries=n_canaries, image_size=IMAGE_SIZE[preset])
    return path


def images(n: int, size: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def peak_bytes(fn, device: str) -> int:
    """Peak bytes allocated during `fn()` above what was held before it: torch.cuda's counter
    on a GPU, the CPU allocator's memory events (torch.profiler) on a CPU."""
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return int(torch.cuda.max_memory_allocated() - base)
    level, peak = 0, 0
    for nbytes in _cpu_memory_events(fn):
        level += nbytes
        peak = max(peak, level)
    return peak


def retained_bytes(fn) -> int:
    """Bytes the CPU allocator still holds after `fn()` that it did not hold before."""
    return int(sum(_cpu_memory_events(fn)))


def _cpu_memory_events(fn) -> list[int]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    return [n for _, n in events]
