"""How far each method moves a stamps set from its real initial pairs, and what val recall that buys,
against iterations: every method at one budget and seed, distilled for up to ``--iterations`` with a
checkpoint every 10; at each of ``--at`` the saved set's mean pixel change from its initialisation (in
the model's normalised units, and relative to the initial images' norm) and the recall of
``--students`` fresh students under the val protocol (val recall at the chosen measurement, and the
test recall there). Methods run as in the ablation's stamps preset (one phase at 50 pairs, PTM-ST on its
shortcut with EMA 0.99, the one-phase methods without EMA).

    python -m benchmarks.stamps_iterations              # needs bash sh/prepare_data.sh stamps
    python -m benchmarks.stamps_iterations --methods lors ptmst --iterations 300 --at 0 30 100 300

Writes benchmarks/results/stamps_iterations.json and .png; runs (resumable) go to --workdir.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Dict, List

import torch

from distill_utils.runtime import checkpoint
from distill_utils.app import ablation
from distill_utils.app.context import load_data, model_config
from distill_utils.pipeline.stages import make_shortcuts
from distill_utils.runtime.errors import UsageError
from distill_utils.students.retrieval import split_benchmarks
from distill_utils.runtime.runlog import setup_logging
from distill_utils.app.cli import scripts
from distill_utils.pipeline import sweep
from distill_utils.pipeline.stages import Workdir

from .common import RESULTS, write_json

METHODS = ("mttvl", "lors", "ptmst", "amd", "repblend")
FLOOR = 0.002  # a tenth of the experts' rate: the step sizes' floor when a run's went negative


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.stamps_iterations", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="./ablation_stamps", help="the ablation's workdir (experts reused)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--budget", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--iterations", type=int, default=1000)
    parser.add_argument("--at", type=int, nargs="+", default=[0, 30, 100, 300, 1000],
                        help="iterations whose sets are measured (multiples of 10)")
    parser.add_argument("--students", type=int, default=3, help="fresh students per measured set")
    args = parser.parse_args(argv)
    bad = [it for it in args.at if it % 10 or it > args.iterations]
    if bad:
        parser.error(f"--at {bad[0]}: measured iterations are multiples of 10 up to --iterations {args.iterations}")
    return args


def pixel_change(start: torch.Tensor, now: torch.Tensor) -> Dict[str, float]:
    delta = (now - start).float()
    return {"mean_abs": delta.abs().mean().item(), "relative": (delta.norm() / start.float().norm()).item()}


def main(argv=None) -> dict:
    setup_logging()
    args = parse_args(argv)
    work = Workdir(Path(args.workdir), scripts())
    ablation_args = ablation.parse_args(["--workdir", str(work), "--preset", "quick", "--dataset", "stamps",
                                         "--methods", *args.methods, "--budgets", str(args.budget),
                                         "--seeds", str(args.seed)])
    plan = ablation_args.plan
    model = ablation.model_namespace(plan, work, ablation_args.distill_flags)
    normal = ablation.train_expert_set(plan, work, model, ablation_args.buffer_flags, frozen=False)
    folders = {"normal": normal, "frozen": normal, "shortcuts": make_shortcuts(plan.quickstart, work, normal)}
    device = torch.device("cpu")
    data = load_data(model, device, augment=False, need_val=True)
    test, val = split_benchmarks(data, device, 128, 0)
    config = model_config(model, data.text_dim)
    settings = sweep.eval_settings_of(plan, model, args.seed)
    settings = type(settings)(**{**settings.__dict__, "num_eval": args.students})
    extra = ["--Iteration", str(args.iterations), "--eval_it", "10", "--eval_init", "true", "--num_eval", "1"]
    out: Dict[str, dict] = {"budget": args.budget, "seed": args.seed, "iterations": args.iterations,
                            "students": args.students, "methods": {}}
    for number, method in enumerate(args.methods, 1):
        run, flags = sweep.run_for(plan, work, method, args.budget, args.seed, folders,
                                      work / "iteration_runs", model.dataset, extra)
        clamp = None
        try:
            seconds = sweep.ensure_run(work, run, flags, f"method {number}/{len(args.methods)}: {method}")
        except UsageError as error:  # a learned step size went negative: again with a floor under them
            clamp = {"clamp_lr": FLOOR, "why": str(error).split(" [")[0]}
            print(f"{method}: {clamp['why']}; again with --clamp_lr {FLOOR}", flush=True)
            run, flags = sweep.run_for(plan, work, method, args.budget, args.seed, folders,
                                          work / "iteration_runs", model.dataset, extra + ["--clamp_lr", str(FLOOR)])
            seconds = sweep.ensure_run(work, run, flags, f"method {number}/{len(args.methods)}: {method}, clamped")
        start = checkpoint.load_distilled(run.path / "distilled_0_0.pt")[0]
        points: List[dict] = []
        for it in args.at:
            subset = checkpoint.load_distilled(run.path / f"distilled_0_{it}.pt")[0]
            began = time.perf_counter()
            found = sweep.students([subset], config, settings, test, val, device)
            points.append({"iteration": it, **pixel_change(start.images, subset.images),
                           "val_r_mean": found["val"]["selected_val_r_mean"],
                           "test_r_mean": found["val"]["selected"]["mean"]["r_mean"],
                           "test_r_mean_std": found["val"]["selected"]["std"]["r_mean"],
                           "lr_img": subset.lr_img, "lr_txt": subset.lr_txt,
                           "eval_seconds": time.perf_counter() - began})
            print(f"{method} it {it}: pixel change {points[-1]['mean_abs']:.4f} ({points[-1]['relative']:.3f}), "
                  f"val R@mean {points[-1]['val_r_mean']:.2f}, test {points[-1]['test_r_mean']:.2f}", flush=True)
        curve = [json.loads(line) for line in (run.path / "metrics.jsonl").read_text().splitlines() if line.strip()]
        out["methods"][method] = {"run": str(run.path), "distill_seconds": seconds, "points": points, "clamp": clamp,
                                  "one_student_test_curve": [(r["iteration"], r["r_mean"]) for r in curve
                                                             if "r_mean" in r]}
    out["plot"] = str(draw(out))
    print(write_json("stamps_iterations", out))
    return out


def draw(out: dict) -> Path:
    """Val recall (left) and mean pixel change (right) against iterations, one line per method."""
    import matplotlib
    matplotlib.use("Agg", force=True)
    from matplotlib import pyplot
    figure, (recall, change) = pyplot.subplots(1, 2, figsize=(11, 4.2), dpi=110)
    for method, found in out["methods"].items():
        its = [max(p["iteration"], 1) for p in found["points"]]  # iteration 0 drawn at 1 on the log axis
        recall.plot(its, [p["val_r_mean"] for p in found["points"]], marker="o", label=method)
        change.plot(its, [p["mean_abs"] for p in found["points"]], marker="o", label=method)
    for axes, label in ((recall, f"val mean recall (%), {out['students']} students"),
                        (change, "mean |pixel change| from the initial pairs")):
        axes.set_xscale("log")
        axes.set_xlabel("distillation iterations (0 drawn at 1)")
        axes.set_ylabel(label)
        axes.grid(alpha=0.3)
    recall.legend()
    figure.suptitle(f"stamps, {out['budget']} pairs, seed {out['seed']}")
    figure.tight_layout()
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "stamps_iterations.png"
    figure.savefig(path)
    pyplot.close(figure)
    return path


if __name__ == "__main__":
    main()
