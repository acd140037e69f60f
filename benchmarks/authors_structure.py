"""What each step from this project's first way of running the comparison to the authors' structure moves,
on the stamps: one change at a time, cumulatively, from the old structure (two even phases on one shared
shortcut endpoint, the iterations split between them, EMA 0.9, step sizes frozen, each phase's initial
pairs drawn on its own) to the authors' (published layout: one phase at 100 pairs or fewer; each phase
its own endpoint and a full run of iterations; EMA 0.99; learned step sizes that train; disjoint
initial pairs); and LoRS from EMA 0.9 with frozen step sizes to its authors' settings. Test recall at
the measurement chosen on val, mean over the preset's students, then mean ± std over seeds.

    python -m benchmarks.authors_structure --workdir ./ablation_stamps     # needs sh/prepare_data.sh stamps

Writes benchmarks/results/authors_structure.json; runs (resumable) go to --workdir/structure_runs.
"""
from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch

from distill_utils.app import ablation
from distill_utils.app.context import load_data, model_config
from distill_utils.pipeline.stages import make_shortcuts
from distill_utils.students.retrieval import split_benchmarks
from distill_utils.runtime.runlog import setup_logging
from distill_utils.app.cli import scripts
from distill_utils.pipeline import sweep
from distill_utils.pipeline.stages import Workdir

from .common import write_json

OLD_FLAGS = {"--ema_decay": "0.9", "--lr_lr": "0", "--phase_init": "independent"}
# (label, method, plan changes, distiller flags), each PTM-ST step adding one change to the one before
STEPS = [
    ("PTM-ST, old structure", "ptmst", dict(ptmst_layout="even", ptmst_endpoints="shared", ptmst_iterations="split"),
     OLD_FLAGS),
    ("+ each phase its own shortcut endpoint", "ptmst", dict(ptmst_layout="even", ptmst_iterations="split"),
     OLD_FLAGS),
    ("+ each phase a full run of iterations", "ptmst", dict(ptmst_layout="even"), OLD_FLAGS),
    ("+ EMA 0.99", "ptmst", dict(ptmst_layout="even"), {**OLD_FLAGS, "--ema_decay": "0.99"}),
    ("+ learned step sizes train (lr_lr 1e-4)", "ptmst", dict(ptmst_layout="even"),
     {"--ema_decay": "0.99", "--phase_init": "independent"}),
    ("+ disjoint initial pairs", "ptmst", dict(ptmst_layout="even"), {"--ema_decay": "0.99"}),
    ("+ published layout (= the authors' structure)", "ptmst", {}, {}),
    ("LoRS, old settings (EMA 0.9, step sizes frozen)", "lors", {}, {"--ema_decay": "0.9", "--lr_lr": "0"}),
    ("LoRS, its authors' (no EMA, lr_lr 1e-4)", "lors", {}, {}),
]


def main(argv=None) -> dict:
    setup_logging()
    parser = argparse.ArgumentParser(prog="python -m benchmarks.authors_structure", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="./ablation_stamps")
    parser.add_argument("--budget", type=int, default=100)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args(argv)
    work = Workdir(Path(args.workdir), scripts())
    base = ablation.parse_args(["--workdir", str(work), "--dataset", "stamps", "--budgets", str(args.budget)]).plan
    model = ablation.model_namespace(base, work, ["--dataset", "stamps"])
    normal = ablation.train_expert_set(base, work, model, [], frozen=False)
    folders = {"normal": normal, "shortcuts": make_shortcuts(base.quickstart, work, normal)}
    device = torch.device("cpu")
    data = load_data(model, device, augment=False, need_val=True)
    test, val = split_benchmarks(data, device, 128, 0)
    config = model_config(model, data.text_dim)
    rows = []
    for number, (label, method, changes, flags) in enumerate(STEPS, 1):
        plan = replace(base, **changes)
        extra = [item for pair in flags.items() for item in pair]
        values, seconds = [], 0.0
        for seed in args.seeds:
            run, run_flags = sweep.run_for(plan, work, method, args.budget, seed, folders,
                                              work / "structure_runs", model.dataset, extra)
            seconds += sweep.ensure_run(work, run, run_flags, f"step {number}/{len(STEPS)} seed {seed}: {label}")
            began = time.perf_counter()
            found = sweep.students(sweep.load_final(run.path), config,
                                      sweep.eval_settings_of(plan, model, seed), test, val, device)
            seconds += time.perf_counter() - began
            values.append(found["val"]["selected"]["mean"]["r_mean"])
        rows.append({"label": label, "method": method, "plan": changes, "flags": flags, "seeds": values,
                     "sizes": sweep.phase_sizes(plan, method, args.budget),
                     "iterations": sweep.phase_iterations(plan, method, args.budget),
                     "mean": statistics.fmean(values), "std": statistics.pstdev(values), "seconds": seconds})
        print(f"{label}: {rows[-1]['mean']:.2f} ± {rows[-1]['std']:.2f} ({seconds:.0f} s)", flush=True)
    out = {"budget": args.budget, "seeds": args.seeds, "rows": rows}
    print(write_json("authors_structure", out))
    return out


if __name__ == "__main__":
    main()
