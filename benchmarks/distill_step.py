"""Seconds per distillation iteration and peak memory: our matching step vs the authors' iteration.

    python -m benchmarks.distill_step --device cpu --config tiny
    python -m benchmarks.distill_step --device cuda --config flickr500

The baseline is the authors' iteration (benchmarks/authors_step.py): rebuild the student and the
text encoder from weights on disk, read a whole expert file pair, a first pass whose double-backward
graphs are dropped step by step, the second pass, the step-size gradients. Ours runs as
distill_ptm-st.py does (snapshots kept on a GPU after the first iteration; ``--keep_graphs`` as
given, auto by default). Each runs in its own
process on identical data, for its peak memory and its gradients (their difference is printed); then
one process runs them in turn, iteration by iteration, for the time ratio, so that a slow spell of a
shared machine, which can outlast a whole process, slows both alike.
"""
from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import List

import torch

from distill_utils import MultilabelContrastiveLoss
from distill_utils.experts import trajectories
from distill_utils.app.cli import count_or
from distill_utils.distillation.matching import AUTO, MatchResult, MiniBatchSampler, TrajectoryMatcher
from distill_utils.experts.snapshot_cache import SnapshotCache
from distill_utils.runtime.speed import enable_fast_math
from distill_utils.distillation.synthetic import SyntheticSet, make_similarity
from networks import SIDES, DualEncoderConfig

from .authors_step import authors_step, prepare_rebuild
from .common import (alternating_seconds, device_name, median_seconds, paired_ratio, peak_memory_mb, summary, table,
                     write_json)


@dataclass(frozen=True)
class Config:
    image_encoder: str
    image_size: int
    text_dim: int
    num_queries: int
    mini_batch_size: int
    syn_steps: int
    snapshots: int  # per expert file (a convexified_0_6 folder holds 6)
    repeats: int


CONFIGS = {
    "tiny": Config("convnet_tiny", 32, 384, 100, 20, 8, 6, 10),
    "flickr500": Config("nfnet", 224, 768, 200, 40, 8, 6, 5),  # NFNet-L0 / BERT-base widths, random weights
    # flickr500's model and steps (so the same operations are dispatched) at a size the CPU runs in seconds
    "nfnet_small": Config("nfnet", 32, 768, 40, 8, 8, 6, 3),
}


def make_inputs(config: Config, folder: Path, image_trainable: bool = True):
    """A synthetic set and one expert file of the right shapes (random values, fixed seed)."""
    torch.manual_seed(0)
    model_config = DualEncoderConfig(config.image_encoder, config.text_dim, image_trainable=image_trainable,
                                     image_pretrained=False)
    model = model_config.build(seed=0)
    generator = torch.Generator().manual_seed(0)
    trajectory = {side: [] for side in SIDES}
    for t in range(config.snapshots):
        for side in SIDES:
            trajectory[side].append([p.detach() + 0.01 * t * torch.randn(p.shape, generator=generator)
                                     for p in model.side_parameters(side)])
    trajectories.write_expert(folder, 0, trajectory["image"], trajectory["text"])
    n = config.num_queries
    synthetic = SyntheticSet(torch.randn(n, 3, config.image_size, config.image_size, generator=generator),
                             torch.randn(n, config.text_dim, generator=generator), make_similarity("full", n), 0.1, 0.1)
    return model_config, synthetic


def ours(model_config, synthetic, folder: Path, config: Config, device: torch.device, keep_graphs: int | str = AUTO,
         standardization: str = "factored"):
    student = model_config.build(seed=0).to(device)
    matcher = TrajectoryMatcher(student, MultilabelContrastiveLoss("WBCE"), config.syn_steps, keep_graphs,
                                factor_standardization=standardization == "factored")
    expert = trajectories.TrajectoryBuffer(folder).experts()[0]
    sampler = MiniBatchSampler(len(synthetic), config.mini_batch_size, torch.Generator().manual_seed(1))
    snapshots = SnapshotCache.from_flag(device, None)  # the distiller's default --expert_cache_gb

    def iteration() -> MatchResult:
        synthetic.zero_grad(set_to_none=True)
        start = {s: snapshots.get(expert, s, 1) for s in SIDES}
        target = {s: snapshots.get(expert, s, 2) for s in SIDES}
        batches = [sampler.next().to(device) for _ in range(config.syn_steps)]
        torch.manual_seed(7)
        result = matcher.match(synthetic, start, target, batches)
        snapshots.settle_budget()
        return result
    return iteration


def reference_style(model_config, synthetic, folder: Path, config: Config, device: torch.device):
    """The authors' iteration (:mod:`benchmarks.authors_step`) on the same inputs and batches as ours."""
    criterion = MultilabelContrastiveLoss("WBCE")
    sampler = MiniBatchSampler(len(synthetic), config.mini_batch_size, torch.Generator().manual_seed(1))
    rebuild = prepare_rebuild(model_config, config.text_dim, folder / "weights")

    def iteration():
        batches = [sampler.next().to(device) for _ in range(config.syn_steps)]
        authors_step(rebuild, synthetic, folder, criterion, batches, start_epoch=1, device=device)
    return iteration


def measure(iteration, device: torch.device, repeats: int) -> dict:
    """Timings and peak memory of ``iteration``; ``out_of_memory`` instead of timings when it does not fit."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        times = median_seconds(iteration, device, repeats)
    except torch.OutOfMemoryError:
        return {"out_of_memory": True, "peak_memory_mb": peak_memory_mb(device)}
    return {**summary(times), "peak_memory_mb": peak_memory_mb(device)}


def measure_alternately(iterations: dict, device: torch.device, repeats: int) -> dict:
    """Both implementations timed in turn in one process; ``out_of_memory`` if they do not fit together."""
    try:
        times = alternating_seconds(iterations, device, repeats)
    except torch.OutOfMemoryError:
        return {"out_of_memory": True}
    return {"ours": summary(times["ours"]), "reference": summary(times["reference"]),
            "time_ratio": paired_ratio(times["ours"], times["reference"])}


def worker(args) -> None:
    device = torch.device(args.device)
    enable_fast_math(device)
    config = CONFIGS[args.config]
    folder = Path(args.folder)
    model_config, synthetic = make_inputs(config, folder)
    synthetic = synthetic.to(device)

    def build(impl: str):
        if impl == "ours":
            return ours(model_config, synthetic, folder, config, device, args.keep_graphs, args.standardization)
        return reference_style(model_config, synthetic, folder, config, device)

    if args.impl == "paired":
        iterations = {impl: build(impl) for impl in ("ours", "reference")}
        print(json.dumps(measure_alternately(iterations, device, config.repeats)))
        return
    iteration = build(args.impl)
    result = measure(iteration, device, config.repeats)
    if not result.get("out_of_memory"):
        synthetic.zero_grad(set_to_none=True)
        outcome = iteration()
        if isinstance(outcome, MatchResult):  # ours: how many graphs it kept (``auto`` chooses)
            result.update(kept_graphs=outcome.kept_graphs, graph_mb=outcome.graph_bytes / 2 ** 20)
        torch.save({n: p.grad.detach().cpu() for n, p in synthetic.named_parameters()}, folder / f"{args.impl}_grads.pt")
    print(json.dumps(result))


def run_worker(impl: str, args, folder: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "benchmarks.distill_step", "--device", args.device,
                          "--config", args.config, "--impl", impl, "--folder", folder,
                          "--keep_graphs", str(args.keep_graphs), "--standardization", args.standardization],
                         capture_output=True, text=True)
    if out.returncode == -signal.SIGKILL:  # the kernel's out-of-memory killer on the CPU
        return {"out_of_memory": True, "peak_memory_mb": None}
    if out.returncode != 0:
        raise SystemExit(f"{impl} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def fitted(*runs: dict | None) -> bool:
    return all(run is not None and not run.get("out_of_memory") for run in runs)


def faster(a: dict | None, b: dict) -> dict:
    """The better of two runs of one implementation: a run that fitted beats one that did not."""
    if not fitted(a):
        return b
    if not fitted(b):
        return a
    return b if b["median_s"] < a["median_s"] else a


def compare(ours_r: dict, ref_r: dict, paired: dict | None) -> dict:
    """Ratios of ours to the authors' iteration. ``time_ratio`` comes from the alternating run (the
    median of side-by-side pairs); the separate processes' medians give a second, noisier one. None
    where a run ran out of memory."""
    alone = fitted(ours_r, ref_r)
    return {"time_ratio": paired["time_ratio"] if alone and fitted(paired) else None,
            "time_ratio_separate_processes": ours_r["median_s"] / ref_r["median_s"] if alone else None,
            "memory_ratio": ours_r["peak_memory_mb"] / ref_r["peak_memory_mb"] if alone else None}


def table_row(name: str, run: dict, alternating: dict | None) -> List[str]:
    if run.get("out_of_memory"):
        peak = run["peak_memory_mb"]
        return [name, "-", "out of memory", "-" if peak is None else f">= {peak:.0f}"]
    in_turn = f"{alternating['median_s']:.3f}" if alternating else "-"
    return [name, in_turn, f"{run['median_s']:.3f}", f"{run['peak_memory_mb']:.0f}"]


def max_relative_difference(ours: dict, reference: dict) -> float:
    """Over every named gradient: its largest deviation from the reference, relative to the reference's largest entry."""
    return max(((ours[k] - reference[k]).abs().max() / reference[k].abs().max().clamp_min(1e-30)).item() for k in ours)


def gradient_difference(folder: Path) -> float | None:
    """``max_relative_difference`` of the two implementations' saved gradients, if both ran."""
    paths = [folder / f"{impl}_grads.pt" for impl in ("ours", "reference")]
    if not all(path.exists() for path in paths):
        return None
    return max_relative_difference(*(torch.load(path) for path in paths))


def add_ours_args(parser: argparse.ArgumentParser) -> None:
    """The flags that choose the device, the config and how :func:`ours` runs (shared with distill_profile)."""
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--config", default="tiny", choices=sorted(CONFIGS))
    parser.add_argument("--keep_graphs", type=count_or(AUTO), default=AUTO,
                        help="distill_ptm-st.py's --keep_graphs for ours (a count, or auto, its default)")
    parser.add_argument("--standardization", default="factored", choices=["factored", "timm"],
                        help="NFNet weight standardisation in ours' student steps: factored out of the graphs "
                             "(as the distiller runs; networks/weight_standardization.py) or inside them, as "
                             "timm's layers compute it, to measure what factoring saves")


def result_name(benchmark: str, args) -> str:
    """The JSON file name for a run of ``benchmark`` with :func:`add_ours_args`' flags (the default
    standardisation unnamed)."""
    suffix = "_timm_standardization" if args.standardization == "timm" else ""
    return f"{benchmark}_{args.config}_{torch.device(args.device).type}_keep{args.keep_graphs}{suffix}"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_ours_args(parser)
    parser.add_argument("--rounds", type=int, default=1,
                        help="own processes per implementation (memory, gradients, a 2nd timing); the fastest is kept")
    parser.add_argument("--impl", choices=["ours", "reference", "paired"], help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.impl:
        return worker(args)
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        for _ in range(args.rounds):
            for impl in ("ours", "reference"):
                results[impl] = faster(results.get(impl), run_worker(impl, args, folder))
        ours_r, ref_r = results["ours"], results["reference"]
        paired = run_worker("paired", args, folder) if fitted(ours_r, ref_r) else None
        difference = gradient_difference(Path(folder))
    in_turn = paired if fitted(paired) else {}
    payload = {"config": asdict(CONFIGS[args.config]), "keep_graphs": args.keep_graphs,
               "standardization": args.standardization,
               "device": device_name(torch.device(args.device)), "ours": ours_r, "reference_style": ref_r,
               "alternating": paired, **compare(ours_r, ref_r, paired),
               "max_relative_gradient_difference": difference}
    kept = (f" (kept {ours_r['kept_graphs']} of {CONFIGS[args.config].syn_steps} graphs)"
            if "kept_graphs" in ours_r else "")
    print(f"distillation iteration, config {args.config}, ours with --keep_graphs {args.keep_graphs}{kept}, "
          f"on {payload['device']}")
    print(table([["implementation", "s/iteration, in turn (median)", "s/iteration, own process", "peak memory MB"],
                 table_row("ours", ours_r, in_turn.get("ours")),
                 table_row("authors' iteration", ref_r, in_turn.get("reference"))]))
    if payload["memory_ratio"] is None:
        print("no ratios: an implementation ran out of memory")
    else:
        separate = payload["time_ratio_separate_processes"]
        if payload["time_ratio"] is None:
            print("the two did not fit in memory together: the time ratio below is from separate processes only")
            timing = f"time ratio {separate:.2f}x (separate processes)"
        else:
            timing = f"time ratio {payload['time_ratio']:.2f}x (separate processes {separate:.2f}x)"
        print(f"{timing}, memory ratio {payload['memory_ratio']:.2f}x, max relative gradient difference "
              f"{'not compared' if difference is None else f'{difference:.2e}'}")
    print(f"written to {write_json(result_name('distill_step', args), payload)}")
    return payload


if __name__ == "__main__":
    main()
