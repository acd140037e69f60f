"""Seconds per distillation iteration against the segments per iteration (K) and the processes (N).

    python -m benchmarks.segments --device cpu --config tiny
    python -m benchmarks.segments --device cpu --config tiny --processes 2   # also 2 gloo processes
    python -m benchmarks.segments --device cpu --config tiny --encoder frozen
    python -m benchmarks.segments --device cuda --config nfnet_small --autocast bf16   # and bf16's error

One process matches K = 1, 2, 4 segments per iteration, one after another (every graph kept, the
CPU default's choice for these models) and batched (``--segment_batching vmap``); N processes each
match K / N of them and add the gradients with an all-reduce (gloo on the CPU, NCCL on GPUs, one GPU
per process). The inputs are :mod:`benchmarks.distill_step`'s (random weights of the config's
widths, one expert file), the image encoder trainable (as the paper's recipes) or frozen (heads on
both sides, as the built-in quick start). Prints a Markdown table and writes
benchmarks/results/segments_CONFIG_ENCODER_DEVICE.json.
"""
from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path
from typing import List, Optional

import torch
import torch.multiprocessing as mp

from distill_utils import MultilabelContrastiveLoss
from distill_utils.experts import trajectories
from distill_utils.runtime.distributed import Ranks, share_of
from distill_utils.distillation.matching import MiniBatchSampler, TrajectoryMatcher
from distill_utils.distillation.segments import Segment, draw_seeds, match_segments
from distill_utils.runtime.speed import enable_fast_math
from networks import SIDES

from .common import device_name, median_seconds, summary, write_json
from .distill_step import CONFIGS, Config, make_inputs

COUNTS = (1, 2, 4)


def iteration_timer(config: Config, folder: Path, device: torch.device, count: int, ranks: Ranks,
                    trainable: bool = True, batched: bool = False, autocast: Optional[torch.dtype] = None):
    """One distillation iteration of ``count`` segments (this rank's share), as distill_ptm-st.py runs it;
    its ``synthetic`` attribute holds the set whose gradients it leaves."""
    model_config, synthetic = make_inputs(config, folder, trainable)
    synthetic = synthetic.to(device)
    matcher = TrajectoryMatcher(model_config.build(seed=0).to(device), MultilabelContrastiveLoss("WBCE"),
                                config.syn_steps, config.syn_steps, autocast=autocast)
    expert = trajectories.TrajectoryBuffer(folder).experts()[0]
    sampler = MiniBatchSampler(len(synthetic), config.mini_batch_size, torch.Generator().manual_seed(1))
    generator = torch.Generator().manual_seed(2)
    last = config.snapshots - 1

    def iteration() -> None:
        synthetic.zero_grad(set_to_none=True)
        starts = torch.randint(last, (count,), generator=generator).tolist()
        batches = [sampler.next().to(device) for _ in range(config.syn_steps)]
        seeds = draw_seeds(generator, count)
        own = [Segment({s: expert.flat(s, starts[j]).to(device) for s in SIDES},
                       {s: expert.flat(s, starts[j] + 1).to(device) for s in SIDES}, seeds[j])
               for j in share_of(count, ranks)]
        match_segments(matcher, synthetic, own, count, batches, ranks, timeout_s=600, batching=batched)
    iteration.synthetic = synthetic
    return iteration


def autocast_error(config: Config, folder: Path, device: torch.device, count: int, trainable: bool) -> float:
    """Largest relative gradient difference of a bf16-autocast iteration against float32, on the same
    inputs (the first iteration of two identical timers): max |g_bf16 - g_f32| / max |g_f32| per tensor."""
    grads = []
    for autocast in (None, torch.bfloat16):
        iteration = iteration_timer(config, folder, device, count, Ranks(), trainable, autocast=autocast)
        iteration()
        grads.append({name: p.grad.double() for name, p in iteration.synthetic.named_parameters() if p.grad is not None})
    full, half = grads
    return max(((half[n] - full[n]).abs().max() / full[n].abs().max()).item() for n in full)


def _rank(rank: int, world: int, store: str, config: Config, folder: str, device: str, counts: List[int],
          out: str, trainable: bool) -> None:
    import torch.distributed as dist
    device = torch.device(f"cuda:{rank}" if device == "cuda" else device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"file://{store}", rank=rank,
                            world_size=world)
    try:
        results = {}
        for count in counts:
            timer = iteration_timer(config, Path(folder) / str(rank), device, count, Ranks(rank, world), trainable)
            results[count] = summary(median_seconds(timer, device, config.repeats))
        if rank == 0:
            torch.save(results, out)
    finally:
        dist.destroy_process_group()


def several_processes(processes: int, config: Config, device: str, threads: int, trainable: bool) -> dict:
    counts = [k for k in COUNTS if k % processes == 0]
    with tempfile.TemporaryDirectory() as folder:
        for rank in range(processes):
            (Path(folder) / str(rank)).mkdir()
        before = os.environ.get("OMP_NUM_THREADS")
        os.environ["OMP_NUM_THREADS"] = str(threads)  # what the spawned processes start with
        try:
            out = str(Path(folder) / "results.pt")
            mp.spawn(_rank, args=(processes, str(Path(folder) / "store"), config, folder, device, counts, out,
                                  trainable), nprocs=processes, join=True)
        finally:
            if before is None:
                os.environ.pop("OMP_NUM_THREADS")
            else:
                os.environ["OMP_NUM_THREADS"] = before
        return torch.load(out)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--config", default="tiny", choices=sorted(CONFIGS))
    parser.add_argument("--processes", type=int, default=1, help="also time this many processes (K a multiple of it)")
    parser.add_argument("--encoder", choices=("trainable", "frozen"), default="trainable",
                        help="the image encoder trained along the trajectories (the paper's recipes) or frozen")
    parser.add_argument("--autocast", choices=("off", "bf16"), default="off",
                        help="bf16: also time the student steps under bf16 autocast (--student_autocast bf16) and "
                             "print their gradient error against float32")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    enable_fast_math(device)
    config = CONFIGS[args.config]
    trainable = args.encoder == "trainable"
    precisions = {"float32": None, **({"bf16": torch.bfloat16} if args.autocast == "bf16" else {})}
    rows, errors = {}, {}
    with tempfile.TemporaryDirectory() as folder:
        for count in COUNTS:
            for batched in (False, True) if count > 1 else (False,):
                for precision, autocast in precisions.items():
                    timer = iteration_timer(config, Path(folder), device, count, Ranks(), trainable, batched,
                                            autocast)
                    rows[(1, count, batched, precision)] = summary(median_seconds(timer, device, config.repeats))
            if args.autocast == "bf16":
                errors[count] = autocast_error(config, Path(folder), device, count, trainable)
    threads = torch.get_num_threads()
    if args.processes > 1:  # the CPU's threads shared out between the processes
        shared = several_processes(args.processes, config, args.device, max(1, threads // args.processes), trainable)
        for count, result in shared.items():
            rows[(args.processes, count, False, "float32")] = result
    one = rows[(1, 1, False, "float32")]["median_s"]
    print(f"{args.config}, image encoder {args.encoder}, on {device_name(device)}; seconds per iteration "
          f"(median of {config.repeats})\n")
    print("| processes | segments per iteration | matching | precision | s per iteration | s per segment | "
          "vs 1 segment on 1 process |")
    print("|---|---|---|---|---|---|---|")
    for (processes, count, batched, precision), result in sorted(rows.items()):
        seconds = result["median_s"]
        how = "batched (vmap)" if batched else ("one segment" if count == processes else "one after another")
        print(f"| {processes} | {count} | {how} | {precision} | {seconds:.3f} | {seconds / count:.3f} | "
              f"{seconds / one:.2f}x |")
    for count, error in errors.items():
        print(f"bf16 autocast, {count} segment(s): largest relative gradient difference against float32 {error:.2e}")
    payload = {"config": args.config, "encoder": args.encoder, "device": device_name(device), "threads": threads,
               "rows": [{"processes": p, "segments": k, "batched": b, "precision": f, **r}
                        for (p, k, b, f), r in sorted(rows.items())],
               "bf16_gradient_error": {str(k): e for k, e in errors.items()}}
    print(f"\n{write_json(f'segments_{args.config}_{args.encoder}_{device.type}', payload)}")
    return payload


if __name__ == "__main__":
    main()
