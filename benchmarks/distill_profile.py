"""Where our distillation iteration spends its time: the operators with the most device time.

    python -m benchmarks.distill_profile --device cuda --config flickr500 [--keep_graphs 8]
    python -m benchmarks.distill_profile --device cpu --config tiny

Builds ours exactly as ``benchmarks.distill_step`` does, runs one warm-up iteration, profiles
``--iterations`` more with ``torch.profiler`` and prints, per iteration: the wall time, the time the
device was busy (on a GPU the sum of its kernels and copies; on the CPU the operators' own time), how
many kernels and copies a GPU ran, the operators with the most own device time, and how many ATen
operations one more iteration dispatches (views apart, which launch no kernel; the count depends on
the model and the steps, not on the image size, so ``--config nfnet_small`` gives flickr500's on the
CPU). A busy time well below the wall time means the GPU waits for the host (kernel launches; CUDA
graphs would help there); a busy time close to it means the kernels themselves are the cost, and the
table says whose they are. The profiler slows the host side a little, so take wall times from
``distill_step``. It also counts the iteration's floating-point operations with torch's FLOP counter
and prints the TFLOP/s achieved in an unprofiled iteration against the device's peak (the TF32
data-sheet figure of a known GPU, or ``--peak_tflops``), so the distance to the physical limit is a
number.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity
from torch.utils._python_dispatch import TorchDispatchMode

from distill_utils.app.cli import positive
from distill_utils.runtime.speed import enable_fast_math

from .common import device_name, synchronize, table, write_json
from .distill_step import CONFIGS, add_ours_args, make_inputs, ours, result_name


class OperationCount(TorchDispatchMode):
    """Counts the ATen operations dispatched below autograd (what would run as kernels), views apart."""

    def __init__(self):
        super().__init__()
        self.operations = self.views = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.operations += 1
        self.views += func.is_view
        return func(*args, **(kwargs or {}))


def count_operations(function) -> dict:
    with OperationCount() as count:
        function()
    return {"operations": count.operations, "views": count.views}


# Dense TF32 tensor-core peaks (TFLOP/s) from the vendors' data sheets: the matching runs in float32
# with TF32 matmuls and convolutions on CUDA (distill_utils.runtime.speed.enable_fast_math).
TF32_PEAK_TFLOPS = {"H200": 494.7, "H100 80GB HBM3": 494.7, "H100 NVL": 417.5, "H100 PCIe": 378.0, "A100": 156.0}


class FlopCount(TorchDispatchMode):
    """Floating-point operations by torch's FLOP formulas (``torch.utils.flop_counter``), counted below
    autograd so that double backwards count too; unlike ``FlopCounterMode`` it tracks no modules, whose
    backward hooks ``autograd.grad`` cannot run under."""

    def __init__(self):
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch.utils.flop_counter import flop_registry
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.flops += formula(*args, **kwargs, out_val=out)
        return out


def count_flops(function) -> int:
    """Floating-point operations of one call (matmuls and convolutions, forward, backward and double
    backward; elementwise work is not counted)."""
    with FlopCount() as count:
        function()
    return count.flops


def peak_tflops(device: torch.device, given: float | None) -> float | None:
    if given is not None or device.type != "cuda":
        return given
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in TF32_PEAK_TFLOPS.items() if key in name), None)


def unprofiled_seconds(iteration, device: torch.device, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        synchronize(device)
        started = time.perf_counter()
        iteration()
        synchronize(device)
        times.append(time.perf_counter() - started)
    return sorted(times)[len(times) // 2]


def profile(iteration, device: torch.device, iterations: int):
    """One untimed call, then ``iterations`` profiled ones; returns the profiler and the wall seconds."""
    iteration()
    synchronize(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.profiler.profile(activities=activities) as profiler:
        started = time.perf_counter()
        for _ in range(iterations):
            iteration()
        synchronize(device)
        wall = time.perf_counter() - started
    return profiler, wall


def own_time_us(event, device: torch.device) -> float:
    """An operator's own time on ``device``: its kernels' on a GPU, its exclusive host time on the CPU."""
    return event.self_device_time_total if device.type == "cuda" else event.self_cpu_time_total


def summarise(profiler, wall: float, iterations: int, device: torch.device, top: int) -> dict:
    """Per-iteration figures of a profile; operators are host-side (CPU) events, which on a GPU carry
    the kernels they launched, so no kernel is counted twice."""
    operators = [e for e in profiler.key_averages() if e.device_type == DeviceType.CPU]
    if device.type == "cuda":
        activities = [e for e in profiler.events() if e.device_type == DeviceType.CUDA]
        busy_us = sum(e.time_range.elapsed_us() for e in activities)
        launched = len(activities) / iterations
    else:
        busy_us, launched = sum(own_time_us(e, device) for e in operators), None
    ranked = sorted(operators, key=lambda e: own_time_us(e, device), reverse=True)[:top]
    return {"iterations": iterations, "wall_s": wall / iterations, "busy_s": busy_us / 1e6 / iterations,
            "device_activities": launched,
            "top": [{"operator": e.key, "own_ms": own_time_us(e, device) / 1e3 / iterations,
                     "share_of_busy": own_time_us(e, device) / busy_us if busy_us else 0.0,
                     "calls": e.count / iterations} for e in ranked]}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_ours_args(parser)
    parser.add_argument("--iterations", type=positive(), default=2, help="profiled iterations after one warm-up")
    parser.add_argument("--top", type=positive(), default=20, help="operators listed")
    parser.add_argument("--peak_tflops", type=positive(float), default=None,
                        help="the device's peak, for the achieved share (default: the TF32 data-sheet peak of a "
                             "known GPU; none on the CPU)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    enable_fast_math(device)
    config = CONFIGS[args.config]
    with tempfile.TemporaryDirectory() as folder:
        model_config, synthetic = make_inputs(config, Path(folder))
        iteration = ours(model_config, synthetic.to(device), Path(folder), config, device, args.keep_graphs,
                         args.standardization)
        profiler, wall = profile(iteration, device, args.iterations)
        dispatched = count_operations(iteration)
        flops = count_flops(iteration)
        seconds = unprofiled_seconds(iteration, device)
    peak = peak_tflops(device, args.peak_tflops)
    achieved = flops / seconds / 1e12
    figures = {**summarise(profiler, wall, args.iterations, device, args.top), "dispatched": dispatched,
               "flops": flops, "unprofiled_s": seconds, "achieved_tflops": achieved, "peak_tflops": peak,
               "share_of_peak": achieved / peak if peak else None}
    payload = {"config": args.config, "keep_graphs": args.keep_graphs, "standardization": args.standardization,
               "device": device_name(device), **figures}
    launched = "" if figures["device_activities"] is None else \
        f", {figures['device_activities']:.0f} kernels and copies"
    in_graph = ", weight standardisation inside the graphs" if args.standardization == "timm" else ""
    print(f"ours, config {args.config}, --keep_graphs {args.keep_graphs}{in_graph}, "
          f"on {payload['device']}: per iteration "
          f"{figures['wall_s']:.3f} s wall (profiled), {figures['busy_s']:.3f} s "
          f"{'device busy' if device.type == 'cuda' else 'in operators'}{launched}; "
          f"{dispatched['operations']} operations dispatched, {dispatched['views']} of them views")
    share = f", {figures['share_of_peak']:.1%} of the {peak:g} TFLOP/s peak" if peak else ""
    print(f"{flops / 1e9:.2f} GFLOP per iteration (matmuls and convolutions) in {seconds:.3f} s unprofiled: "
          f"{achieved:.3g} TFLOP/s achieved{share}")
    print(table([["operator", "own ms/iteration", "share of busy", "calls/iteration"]] + [
        [row["operator"], f"{row['own_ms']:.2f}", f"{row['share_of_busy']:.1%}", f"{row['calls']:.0f}"]
        for row in figures["top"]]))
    print(f"written to {write_json(result_name('distill_profile', args), payload)}")
    return payload


if __name__ == "__main__":
    main()
