"""What freezing the image encoder costs in recall on the stamps: full-data students (the student recipe,
30 epochs, batch 32: distill_utils.students.full_data) with EfficientNet-Lite0 frozen and two projection heads (the stamps recipes), against
the whole encoder trained, at two image-side learning rates; one student per seed, seeds 0 1 2.

    python -m benchmarks.frozen_encoder_cost        # needs bash sh/prepare_data.sh stamps
"""
from __future__ import annotations

import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch

from distill_utils.app import ablation, distill
from distill_utils.app.context import load_data, model_config
from distill_utils.pipeline.settings import STAMPS
from distill_utils.students.full_data import FullDataSettings, Recipe, pair_source, train_on_all
from distill_utils.students.retrieval import split_benchmarks
from distill_utils.runtime.runlog import setup_logging
from distill_utils.app.cli import scripts
from distill_utils.pipeline import sweep
from distill_utils.pipeline.stages import Workdir

from .common import write_json

SETTINGS = ((False, 0.02), (True, 0.02), (True, 0.002))  # (image encoder trained, its learning rate)


def full_data_recall(trainable: bool, lr_img: float, work: Workdir, seeds=(0, 1, 2)) -> dict:
    plan = replace(ablation.REAL_PRESETS["default"], quickstart=replace(STAMPS, image_trainable=trainable))
    flags = sweep.distill_flags(plan, work, "lors", 20, 0, {"normal": "unused"}, work, "unused")
    args = distill.parse_args(flags + ["--lr_teacher_img", str(lr_img)])
    device = torch.device("cpu")
    data = load_data(args, device, augment=False, need_val=True)
    test, val = split_benchmarks(data, device, 128, 0)
    config = model_config(args, data.text_dim)
    settings = FullDataSettings(lr_img=lr_img, lr_txt=args.lr_teacher_txt, loss_type=args.loss_type)
    source, recipe = pair_source(data, settings, device), Recipe(30, lr_img, args.lr_teacher_txt, 32)
    recalls, started = [], time.perf_counter()
    for seed in seeds:
        recalls.append(train_on_all(source, config, recipe, settings, test, val, seed, device).selected["r_mean"])
    return {"trainable": trainable, "lr_img": lr_img, "r_mean": recalls, "mean": statistics.fmean(recalls),
            "std": statistics.pstdev(recalls), "seconds": time.perf_counter() - started}


def main() -> list:
    setup_logging()
    work = Workdir(Path("./benchmarks/results/frozen_encoder_cost"), scripts())
    rows = [full_data_recall(t, lr, work) for t, lr in SETTINGS]
    for row in rows:
        print(f"encoder {'trained' if row['trainable'] else 'frozen '} lr_img {row['lr_img']}: "
              f"R@mean {row['mean']:.2f} ± {row['std']:.2f} ({row['seconds']:.0f} s)")
    print(write_json("frozen_encoder_cost", {"rows": rows}))
    return rows


if __name__ == "__main__":
    main()
