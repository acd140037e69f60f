"""The full-data reference row on the stamps, as the ablation computes it: epochs, learning rate and batch
chosen on val from the stamps grid (distill_utils.students.full_data), then ``num_eval`` students per seed; beside
it the random subsets of the ablation's budgets, trained at once under the same val protocol.

    python -m benchmarks.full_data_row            # needs bash sh/prepare_data.sh stamps

Writes benchmarks/results/full_data_row.json.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from distill_utils.app import ablation
from distill_utils.app.context import load_data, model_config
from distill_utils.students.retrieval import split_benchmarks
from distill_utils.runtime.runlog import setup_logging
from distill_utils.app.cli import scripts
from distill_utils.pipeline import sweep
from distill_utils.pipeline.stages import Workdir

from .common import write_json


def main(argv=None) -> dict:
    setup_logging()
    parser = argparse.ArgumentParser(prog="python -m benchmarks.full_data_row", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="./ablation_stamps", help="where the text features are cached")
    work = Workdir(Path(parser.parse_args(argv).workdir), scripts())
    plan = ablation.parse_args(["--workdir", str(work), "--dataset", "stamps"]).plan
    device = torch.device("cpu")
    model = ablation.model_namespace(plan, work, ["--dataset", "stamps"])
    data = load_data(model, device, augment=False, need_val=True)
    test, val = split_benchmarks(data, device, 128, 0)
    config = model_config(model, data.text_dim)
    started, results, seconds = time.perf_counter(), {}, {}
    sweep.full_rows(plan, model, data, config, test, val, device, results, seconds)
    full = [results[(sweep.FULL_DATA, plan.budgets[0], seed)]["val"]["selected"]["mean"]["r_mean"]
            for seed in plan.seeds]
    search = results[(sweep.FULL_DATA, plan.budgets[0], plan.seeds[0])]
    rows = {"full": {"seeds": full, "mean": statistics.fmean(full), "std": statistics.pstdev(full)}}
    for budget in plan.budgets:
        values = []
        for seed in plan.seeds:
            reals = sweep.reference_subsets("random", data, [budget], seed, None, model)
            found = sweep.students(reals, config, sweep.eval_settings_of(plan, model, seed), test, val, device)
            values.append(found["val"]["selected"]["mean"]["r_mean"])
        rows[f"random {budget}"] = {"seeds": values, "mean": statistics.fmean(values), "std": statistics.pstdev(values)}
    for name, row in rows.items():
        print(f"{name}: R@mean {row['mean']:.2f} ± {row['std']:.2f}")
    out = {"chosen": search["search"][search["chosen"]], "search": search["search"],
           "full_data_seconds": seconds[sweep.FULL_DATA], "seconds": time.perf_counter() - started, "rows": rows,
           "seeds": list(plan.seeds)}
    print(write_json("full_data_row", out))
    return out


if __name__ == "__main__":
    main()
