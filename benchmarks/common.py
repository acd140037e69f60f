"""Timing, memory and output helpers shared by the benchmarks."""
from __future__ import annotations

import json
import resource
import statistics
import time
from pathlib import Path
from typing import Callable, Dict, List

import torch

from distill_utils.runtime.atomic import atomic_write_text

RESULTS = Path(__file__).resolve().parent / "results"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def alternating_seconds(functions: Dict[str, Callable[[], None]], device: torch.device, repeats: int,
                        warmup: int = 1) -> Dict[str, List[float]]:
    """Time several functions in turn (a, b, a, b, ...) in one process, so that a slow spell of a shared
    machine hits each of them alike; ``warmup`` untimed rounds first. Returns every timing per name."""
    for _ in range(warmup):
        for function in functions.values():
            function()
    synchronize(device)
    times = {name: [] for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            started = time.perf_counter()
            function()
            synchronize(device)
            times[name].append(time.perf_counter() - started)
    return times


def median_seconds(function: Callable[[], None], device: torch.device, repeats: int, warmup: int = 1) -> List[float]:
    """Run ``warmup`` untimed calls, then ``repeats`` timed ones; returns every timing."""
    return alternating_seconds({"only": function}, device, repeats, warmup)["only"]


def paired_ratio(numerators: List[float], denominators: List[float]) -> float:
    """Median of the ratios of timings taken side by side: each pair saw the same state of the machine."""
    return statistics.median(a / b for a, b in zip(numerators, denominators, strict=True))


def peak_memory_mb(device: torch.device) -> float:
    """Peak CUDA allocation on a GPU; peak resident set of this process on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def allocation_peak_bytes(function: Callable[[], object]) -> int:
    """Peak of the bytes allocated (and not yet freed) while ``function`` runs, above the level it
    started at, from the profiler's record of every allocation and free on the CPU and GPU. Exact
    and deterministic, unlike a process's resident set, so tests can compare how memory grows."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as recorded:
        function()
    events = sorted((e.start_ns(), e.nbytes()) for e in recorded.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    live = peak = 0
    for _, change in events:
        live += change
        peak = max(peak, live)
    return peak


def summary(times: List[float]) -> dict:
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "repeats": len(times)}


def write_json(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    atomic_write_text(path, json.dumps(payload, indent=1, default=str))
    return path


def table(rows: List[List[str]]) -> str:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
