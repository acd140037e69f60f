"""The whole pipeline on the built-in ``shapes`` dataset, in one command (``bash sh/quickstart.sh``).

generate data -> pretrain the small image encoder -> train experts -> shortcut trajectories -> two-phase PTM-ST distillation ->
evaluation against a random real subset of the same size and the full data -> a report folder
(Markdown summary, image grids before/after, decoded captions). Every stage is the real script's
``main``; finished data, encoder and experts are reused on a rerun.

The stages are :mod:`distill_utils.pipeline.stages`; reuse is by fingerprint (data, pretrained encoder
and experts each in a folder named by the digest of the flags that decide it).
"""
from __future__ import annotations

import argparse
import datetime
import json
import shutil
from dataclasses import asdict, replace
from pathlib import Path
from typing import Dict, Optional, Sequence

from ..pipeline.settings import QUICKSTART as PRESETS, Settings
from ..pipeline.stages import (EXPORT, Stages, Workdir, generate_data, make_shortcuts, pretrain_encoder,
                               run_distillation, run_evaluation, train_experts)
from ..runtime.atomic import atomic_write_text
from ..runtime.errors import writable_folder
from ..runtime.runlog import setup_logging
from ..students.evaluation import format_table

from .cli import run_script, scripts

def write_report(s: Settings, run: Path, report: Path, rows: Dict[str, dict], seconds: Dict[str, float]) -> Path:
    for k, iterations in enumerate(s.iterations):
        for tag, it in (("before", 0), ("after", iterations)):
            shutil.copy(run / f"synthetic_{k}_{it}.png", report / f"phase{k}_{tag}.png")
            shutil.copy(run / f"captions_{k}_{it}.txt", report / f"phase{k}_{tag}_captions.txt")
    names = list(rows)
    margin = rows[names[0]]["mean"]["r_mean"] - rows[names[1]]["mean"]["r_mean"]
    lines = [
        "# PTM-ST quick start on the built-in shapes dataset", "",
        f"Distilled {sum(s.num_queries)} synthetic pairs in {len(s.num_queries)} phases from {s.num_train * 5} "
        f"training pairs. Recall (%) on {s.num_test} test images, mean ± std over {s.num_eval} fresh students "
        f"(paper protocol).", "", format_table(rows), "",
        f"**Distilled minus random subset of the same size: {margin:+.2f} mean recall.**", "",
        "## Time per stage", "", "| stage | seconds |", "|---|---|",
        *[f"| {name} | {value:.1f} |" for name, value in seconds.items()],
        f"| total | {sum(seconds.values()):.1f} |", "",
        "## Synthetic images (phase k: before = real initialisation, after = distilled)", "",
        *[f"phase {k}: ![before](phase{k}_before.png) ![after](phase{k}_after.png)" for k in range(len(s.iterations))],
        "", "Decoded captions (nearest training caption of each synthetic text feature): "
        + ", ".join(f"`phase{k}_after_captions.txt`" for k in range(len(s.iterations))), "",
        f"The distilled set, loadable without this code (PNG + metadata.jsonl, safetensors, dataset card): "
        f"`{EXPORT}/`; `python eval.py --synthetic {report / EXPORT}` evaluates it again.", "",
        "## Settings", "", "```json", json.dumps(asdict(s), indent=1), "```", "",
        f"Run folder (checkpoints, metrics.jsonl): `{run}`", ""]
    path = report / "README.md"
    atomic_write_text(path, "\n".join(lines))
    return path


def main(argv: Optional[Sequence[str]] = None) -> Path:
    parser = argparse.ArgumentParser(prog="quickstart", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="./quickstart", help="data, experts, runs and reports go here")
    parser.add_argument("--preset", default="default", choices=sorted(PRESETS), help="smoke: a handful of steps")
    parser.add_argument("--seed", type=int, default=None, help="override the preset's seed")
    args = parser.parse_args(argv)
    setup_logging()
    settings = PRESETS[args.preset] if args.seed is None else replace(PRESETS[args.preset], seed=args.seed)
    work = Workdir(writable_folder(Path(args.workdir), "--workdir"), scripts())
    stamp = f"{datetime.datetime.now():%Y%m%d_%H%M%S}_seed{settings.seed}"
    report = work / "reports" / stamp
    report.mkdir(parents=True, exist_ok=True)
    stages = Stages()
    stages.run("data", generate_data, settings, work)
    stages.run("pretrain encoder", pretrain_encoder, settings, work)
    normal = stages.run("experts", train_experts, settings, work)
    shortcuts = stages.run("shortcut trajectories", make_shortcuts, settings, work, normal)
    run = stages.run("distillation", run_distillation, settings, work, shortcuts, f"quickstart_{stamp}")
    rows = stages.run("evaluation", run_evaluation, settings, work, run, report)
    path = write_report(settings, run, report, rows, stages.seconds)
    print(f"\nreport: {path}\n\n{format_table(rows)}\n\ntotal {sum(stages.seconds.values()):.0f}s")
    return path


if __name__ == "__main__":
    run_script(main, outputs={"--workdir": "./quickstart"},
               interrupted="interrupted: the stages that finished (data, pretrained encoder, experts, shortcut "
                           "trajectories) are kept in --workdir and reused; run the same command again to go on.")
