"""The full-data reference row on the stamps, as the ablation computes it: epochs, learning rate and batch
chosen on val from the stamps grid (distill_utils.full_data), then ``num_eval`` students per seed; beside
it the random subsets of the ablation's budgets, trained at once under the same val protocol.

    python -m benchmarks.full_data_row            # needs bash sh/prepare_data.sh stamps

Writes benchmarks/results/full_data_row.json.
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
from distill_utils.full_data import FullDataSettings, choose_recipe, pair_source, recipe_of, recipe_students
from distill_utils.retrieval import split_benchmarks
from distill_utils.runlog import setup_logging

from .common import write_json


def main(argv=None) -> dict:
    setup_logging()
    parser = argparse.ArgumentParser(prog="python -m benchmarks.full_data_row", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="./ablation_stamps", help="where the text features are cached")
    work = Path(parser.parse_args(argv).workdir)
    plan = ablation.parse_args(["--workdir", str(work), "--dataset", "stamps"]).plan
    s, device = plan.quickstart, torch.device("cpu")
    model = ablation.model_namespace(plan, work, ["--dataset", "stamps"])
    data = load_data(model, device, augment=False, need_val=True)
    test, val = split_benchmarks(data, device, 128, 0)
    config = model_config(model, data.text_dim)
    settings = FullDataSettings(epochs=s.full_epochs, lr_scales=s.full_lr_scales, batches=s.full_batches,
                                lr_img=model.lr_teacher_img, lr_txt=model.lr_teacher_txt, num_eval=s.num_eval,
                                loss_type=model.loss_type)
    started = time.perf_counter()
    source = pair_source(data, settings, device)
    chosen, scores = choose_recipe(source, config, settings, test, val, device)
    search_seconds = time.perf_counter() - started
    recipe = recipe_of(settings, settings.grid()[chosen])
    full = []
    for seed in plan.seeds:
        found = recipe_students(source, config, recipe, replace(settings, seed=seed), test, val, device)
        full.append(found["val"]["selected"]["mean"]["r_mean"])
    rows = {"full": {"seeds": full, "mean": statistics.fmean(full), "std": statistics.pstdev(full)}}
    for budget in plan.budgets:
        values = []
        for seed in plan.seeds:
            reals = ablation.reference_subsets("random", data, [budget], seed, None, model)
            found = ablation.students(reals, config, ablation.eval_settings_of(plan, model, seed), test, val, device)
            values.append(found["val"]["selected"]["mean"]["r_mean"])
        rows[f"random {budget}"] = {"seeds": values, "mean": statistics.fmean(values), "std": statistics.pstdev(values)}
    for name, row in rows.items():
        print(f"{name}: R@mean {row['mean']:.2f} ± {row['std']:.2f}")
    out = {"chosen": scores[chosen], "search": scores, "search_seconds": search_seconds,
           "seconds": time.perf_counter() - started, "rows": rows, "seeds": list(plan.seeds)}
    print(write_json("full_data_row", out))
    return out


if __name__ == "__main__":
    main()
