"""Methods side by side under one protocol (``bash sh/ablation.sh``).

One set of experts (plus, for RepBlend's frozen image encoder, one set trained the same way with
the encoder frozen), then for every budget, method and seed one distillation at equal budget, every
final set evaluated by the same fresh students: test recall at the measurement chosen on the val split
(val protocol), and the best test measurement beside it (paper protocol), mean ± std over seeds.
Each method runs as its authors run it: MTT-VL and LoRS one phase without EMA; PTM-ST as in the authors'
recipes (one phase up to 100 pairs, else two phases on their own shortcut endpoints, each phase as many
iterations as a one-phase method gets, EMA 0.99; ``--ptmst_layout``, ``--ptmst_endpoints``,
``--ptmst_iterations`` and ``--ptmst_ema`` bring back other structures). Real training pairs of each budget
are the reference rows: a random subset, the same random pairs split into PTM-ST's phases and trained under
its student schedule, the herding, k-center and forgetting coresets (``--coresets``, selected with the
first expert), and the full training set (its students' epochs, learning rate and batch chosen on val).
``--students NAME ...`` adds a cross-architecture table: every method's sets and every reference row
trained by students of each listed image encoder.
``--dataset stamps`` (``openclipart``, or ``folder``) among the pass-through flags switches to the real-image
settings (``pipeline.settings.STAMPS``, ``OPENCLIPART``: frozen ImageNet EfficientNet-Lite0, MiniLM, budgets 20 50 100).
``--iterations N`` sets a one-phase method's distillation iterations (and each PTM-ST phase's).
Writes a report folder: README.md (tables laid out like the papers': budgets as column groups of IR@1/5/10,
TR@1/5/10 and their mean; time per method; settings), results.json, matplotlib plots (PNG) of mean
recall against budget and across students, and each method's synthetic images.

``--launcher slurm`` (or ``submitit_local``: the same jobs as processes here) runs the experts as one job, then
every distillation and every set's students as submitit job arrays, and builds the same report from the run
folders (docs/usage.md, "Sweeps on a Slurm cluster").

Reuse is by fingerprint: each run's folder is ``{method}_b{budget}_s{seed}_{digest}``, the digest taken
over every flag that decides its result (the experts' folders are fingerprinted the same way, and
their digests enter the runs' through --buffer_path). A finished run is reused and a cut run resumes
only when its flags equal the requested ones; a call with a changed flag makes new runs beside the old
ones, and the report names the runs it was built from.
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from dataclasses import asdict, replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from networks.image_encoders import is_known_image_encoder, unknown_image_encoder_message

from ..distillation.methods import METHODS
from ..pipeline.reports import (cross_rows, cross_table, draw_plots, paper_table, publish, report_rows, report_stamp,
                                table)
from ..pipeline.settings import OPENCLIPART, QUICKSTART, STAMPS, TEN_EPOCH_SHAPES
from ..pipeline.stages import Workdir, generate_data
from ..pipeline.sweep import (OWNED, SEARCH_SEED, SEARCHED, ORDER, Plan, RunRecord, check_budgets_fit,
                              Experts, distill_all, evaluate_all, even_split, export_runs, flag_groups,
                              flags_for, values_of, model_namespace, one_phase_iterations, search_rates)
from ..runtime.atomic import atomic_write_text
from ..runtime.errors import writable_folder
from ..runtime.runlog import setup_logging
from ..runtime.runs import RunFolder
from ..students.coresets import CORESETS

from .cli import add_launcher_flags, launcher_of, run_script, scripts

SCRIPTS = scripts()
DISTILL_FLAGS = SCRIPTS.distill.options()
BUFFER_FLAGS = SCRIPTS.buffer.options()

PRESETS: Dict[str, Plan] = {
    "default": Plan(quickstart=TEN_EPOCH_SHAPES),
    "quick": Plan(seeds=(0,), budgets=(40,), quickstart=TEN_EPOCH_SHAPES),
    # a handful of steps, for the test suite
    "smoke": Plan(seeds=(0,), budgets=(4,), quickstart=QUICKSTART["smoke"], frozen_out_embedding=32),
}
# --dataset stamps, openclipart (or folder) among the pass-through flags: real images through a pretrained, frozen
# encoder, each dataset's settings
REAL_PRESETS: Dict[str, Plan] = {
    "default": Plan(budgets=(20, 50, 100), quickstart=STAMPS, frozen_out_embedding=STAMPS.out_embedding),
    "quick": Plan(seeds=(0,), budgets=(50,), quickstart=STAMPS, frozen_out_embedding=STAMPS.out_embedding),
    "smoke": Plan(seeds=(0,), budgets=(4,), frozen_out_embedding=STAMPS.out_embedding, quickstart=replace(
        STAMPS, image_size=32, num_experts=1, train_epochs=3, phases=((0, 3, 0, 1), (0, 3, 0, 2)), iterations=(2, 2),
        eval_it=2, syn_steps=2, mini_batch_size=2, epoch_eval_train=2, num_eval=1, full_epochs=(1,),
        full_lr_scales=(1.0,), full_batches=(8,))),
}
REAL_SETTINGS = {"stamps": STAMPS, "openclipart": OPENCLIPART, "folder": STAMPS}
PTMST_CHOICES = ("ptmst_layout", "ptmst_endpoints", "ptmst_iterations", "ptmst_ema")


def copy_images(records: Sequence[RunRecord], report: Path, seed: int) -> List[str]:
    """The final synthetic images of every method and budget (first seed), one PNG per phase."""
    names = []
    for record in records:
        if record.seed != seed:
            continue
        folder = Path(record.folder)
        for k, iterations in enumerate(RunFolder(folder).recorded_args()["Iteration"]):
            name = f"{record.method}_b{record.budget}_phase{k}.png"
            shutil.copy(folder / f"synthetic_{k}_{iterations}.png", report / "images" / name)
            names.append(name)
    return names


def write_report(plan: Plan, report: Path, results: Dict, records: Sequence[RunRecord], eval_seconds: Dict[str, float],
                 command: str, images: Sequence[str], model: argparse.Namespace,
                 searched: Optional[Dict[Tuple[str, int], dict]] = None) -> Path:
    rows = report_rows(plan, results)
    distill_seconds = {m: sum(r.seconds for r in records if r.method == m) for m in plan.methods}
    s = plan.quickstart
    plots = draw_plots(plan, results, report, rows)
    payload = {"plan": asdict(plan), "command": command,
               "results": [{"method": key[0], "budget": key[1], "seed": key[2],
                            "student": key[3] if len(key) > 3 else None, **protocols}
                           for key, protocols in results.items()],
               "distill_seconds": distill_seconds, "eval_seconds": eval_seconds,
               "lr_search": [{"method": m, "budget": b, **found} for (m, b), found in (searched or {}).items()]}
    atomic_write_text(report / "results.json", json.dumps(payload, indent=1, default=str))
    lines = [
        "# Methods side by side on one codebase", "",
        f"Command: `{command}`", "",
        f"Mean recall (%) on the test split: for each seed, the mean over {s.num_eval} fresh students; "
        f"then mean ± std over seeds {list(plan.seeds)}. Every method distils the same total number of pairs "
        f"from the same experts, as its authors run it: {structure_sentence(plan)} "
        + ("with the learning rates each chose from the same search (below), " if plan.lr_search else
           "with the same learning rates, ")
        + "and is evaluated by the same code.", "",
        "## Val protocol (measurement chosen on the val split; test recall reported)", "",
        table(plan, results, "val", rows), "",
        "## Paper protocol (best of the test measurements, as the papers report)", "",
        table(plan, results, "paper", rows), "",
        "![mean recall against budget](recall_vs_budget.png)", "",
        *coreset_note(plan, rows),
        "## Every recall, laid out as the papers' tables", "",
        "IR: image retrieval (text to image); TR: text retrieval (image to text); mean: of the six.", "",
        "### Val protocol", "", paper_table(plan, results, "val", rows), "",
        "### Paper protocol", "", paper_table(plan, results, "paper", rows), "",
        *cross_section(plan, results), *[f"![{name}]({name})" for name in plots[1:]], "",
        "## Time per method (seconds, all budgets and seeds)", "",
        "| method | distillation | evaluation |", "|---|---|---|",
        *[f"| {m} | {distill_seconds.get(m, 0.0):.0f} | {eval_seconds.get(m, 0.0):.0f} |" for m in rows], "",
        "A run reused from an earlier call counts with the time it took then (0 if that was not recorded).", "",
        "## Learning-rate search", "", *search_section(plan, model, searched or {}),
        "## Runs this report is built from", "",
        "Each folder's name ends in the fingerprint of the flags that decide its result; its args.json and "
        "args_history.jsonl hold them.", "",
        *[f"- `{r.folder}`" for r in records], "",
        "## Exported sets", "",
        "Every run's final set, loadable without this code, is in `exports/{method}_b{budget}_s{seed}/` (PNG images "
        "with metadata.jsonl for `datasets.load_dataset(\"imagefolder\", data_dir=...)`, synthetic.safetensors, a "
        "dataset card with its val-protocol recall); `python eval.py --synthetic FOLDER` evaluates one again.", "",
        "## Synthetic images (first seed)", "",
        *[f"![{name}](images/{name}) `{name}`" for name in images], "",
        "## Settings", "", "```json", json.dumps(asdict(plan), indent=1), "```", ""]
    path = report / "README.md"
    atomic_write_text(path, "\n".join(lines))
    return path


def structure_sentence(plan: Plan) -> str:
    s, one = plan.quickstart, one_phase_iterations(plan.quickstart)
    layout = {"published": "one phase up to 100 pairs, two above (the authors' split)",
              "one": "one phase at every budget (the first phase's shortcut and starts)"}.get(
        plan.ptmst_layout, f"{len(s.phases)} phases of equal shares")
    endpoints = ("each phase on its own shortcut endpoint" if plan.ptmst_endpoints == "own"
                 else "every phase on the first phase's shortcut endpoint")
    iterations = (f"{one} iterations per phase" if plan.ptmst_iterations == "per_phase"
                  else f"{one} iterations shared out over the phases")
    return (f"the one-phase methods {one} iterations, EMA decay {plan.one_phase_ema:g}; PTM-ST {layout}, "
            f"{endpoints}, {iterations}, EMA decay {plan.ptmst_ema:g}.")


def search_section(plan: Plan, model: argparse.Namespace, searched: Dict[Tuple[str, int], dict]) -> List[str]:
    if not searched:
        return ["None for any method: every method uses the same rates "
                f"(--lr_img {model.lr_img} --lr_txt {model.lr_txt} --lr_sim {model.lr_sim} --lr_lr {model.lr_lr}; by "
                "default the quick start's, chosen for PTM-ST before this comparison existed). The search budget is "
                "therefore equal (zero) for every method (--lr_search N gives each the same N configurations).", ""]
    configs = next(iter(searched.values()))["configs"]
    lines = [f"Every method and budget tried the same {len(configs)} configurations (the first is the settings' own "
             f"rates), each distilled at seed {SEARCH_SEED} and trained by {plan.quickstart.num_eval} students at that "
             "seed; the cell is their mean r_mean on the val split at the point the val protocol selects. The "
             "configuration with the highest val score (bold) then ran every reported seed. Test recall never "
             "entered the choice.", "",
             "| configuration | " + " | ".join(SEARCHED) + " |", "|---|" + "---|" * len(SEARCHED),
             *[f"| {k} | " + " | ".join(f"{c[name]:g}" for name in SEARCHED) + " |" for k, c in enumerate(configs)], "",
             "| method | budget | " + " | ".join(f"config {k}" for k in range(len(configs))) + " |",
             "|---|---|" + "---|" * len(configs)]
    for (method, budget), found in searched.items():
        cells = [f"**{v:.2f}**" if k == found["chosen"] else f"{v:.2f}" for k, v in enumerate(found["scores"])]
        lines.append(f"| {method} | {budget} | " + " | ".join(cells) + " |")
    return lines + [""]


def coreset_note(plan: Plan, rows: Sequence[str]) -> List[str]:
    shown = [row for row in rows if row in CORESETS]
    missing = [kind for kind in plan.coresets if kind not in shown]
    lines = []
    if shown:
        lines += [f"Coreset rows ({', '.join(shown)}) select real training pairs with the first expert (its final "
                  "snapshot's joint embedding; its recorded forgetting events): see docs/methods.md.", ""]
    if missing:
        lines += [f"Left out: {', '.join(missing)} (the experts hold no forgetting record: they were trained before "
                  "buffer.py recorded one; see the log).", ""]
    return lines


def cross_section(plan: Plan, results: Dict) -> List[str]:
    rows = cross_rows(plan, results)
    if not rows:
        return []
    return ["## Cross-architecture: each set trained by other students", "",
            "The same distilled sets and reference subsets, trained by students of another image encoder (random "
            "weights, trained, at the distiller's image size). Mean recall (%), mean ± std "
            "over seeds.", "",
            "### Val protocol", "", cross_table(plan, results, "val", rows), "",
            "### Paper protocol", "", cross_table(plan, results, "paper", rows), "",
            *[line for student in plan.students for line in (
                f"### Student {student}: every recall (val protocol)", "",
                paper_table(plan, results, "val", rows, student), "")]]


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="ablation", description=__doc__, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="./ablation", help="data, experts, runs and reports go here "
                                                                "(shared with the quick start's layout)")
    parser.add_argument("--preset", default="default", choices=sorted(PRESETS),
                        help="default: seeds 0 1 2, budgets 20 40 (stamps: 20 50 100); quick: seed 0, budget 40 "
                             "(stamps: 50); smoke: tests")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="override the preset's seeds")
    parser.add_argument("--budgets", type=int, nargs="+", default=None, help="override the preset's budgets (pairs)")
    parser.add_argument("--methods", nargs="+", default=None, choices=sorted(METHODS),
                        help="override the preset's methods")
    parser.add_argument("--coresets", nargs="+", default=None, choices=[*CORESETS, "none"],
                        help="coreset rows beside the random subset (default: all three; --coresets none: no row)")
    parser.add_argument("--lr_search", type=int, default=0, metavar="N",
                        help="give every method the same N configurations of --lr_img, --lr_txt and --lr_lr (the "
                             "first: the preset's), distilled at a seed of their own and chosen on the val split; "
                             "the chosen one runs the reported seeds (default 0: no search)")
    parser.add_argument("--students", nargs="+", default=None, metavar="IMAGE_ENCODER",
                        help="add a cross-architecture table: every set and reference row trained by students of "
                             "each of these image encoders (built-in names or timm models, e.g. convnet)")
    authors = parser.add_argument_group(
        "PTM-ST's structure", "the defaults are the authors' recipes; the other choices bring back how this "
        "comparison first ran PTM-ST (docs/findings.md: what each change moved)")
    authors.add_argument("--ptmst_layout", choices=["published", "even", "one"], default=None,
                         help="published (default): one phase up to 100 pairs, above that two, split like the "
                              "authors' (half, or 2/5 from 500 pairs: 200 + 300); even: every phase, equal shares; "
                              "one: a single phase at every budget (the shortcut without the phases)")
    authors.add_argument("--ptmst_endpoints", choices=["own", "shared"], default=None,
                         help="own (default): each phase matches its own shortcut endpoint (epochs 6 and 8 of "
                              "10-epoch experts); shared: every phase matches the first phase's")
    authors.add_argument("--ptmst_iterations", choices=["per_phase", "split"], default=None,
                         help="per_phase (default): each phase runs as many iterations as a one-phase method; "
                              "split: the one-phase methods' iterations shared out over the phases")
    authors.add_argument("--ptmst_ema", type=float, default=None, metavar="DECAY",
                         help="EMA decay of PTM-ST's saved set (default 0.99, the authors'; 0: none)")
    add_launcher_flags(parser)
    parser.add_argument("--iterations", type=int, default=None, metavar="N",
                        help="distillation iterations of a one-phase method (PTM-ST: of each phase, as its authors "
                             "run it; default: the preset's, 400 on shapes, 1000 on real images)")
    args, extra = parser.parse_known_args(argv)
    for flag, values in (("--seeds", args.seeds), ("--budgets", args.budgets), ("--methods", args.methods),
                         ("--coresets", args.coresets), ("--students", args.students)):
        repeated = sorted({v for v in values or () if list(values).count(v) > 1}, key=str)
        if repeated:
            parser.error(f"{flag} names {', '.join(map(str, repeated))} more than once: each seed, budget or method "
                         f"counts once (a repeated seed would count the same runs twice in the mean ± std)")
    groups = flag_groups(extra)
    for group in groups:
        flag = group[0].split("=", 1)[0]
        if flag in OWNED:
            parser.error(f"{flag} is set by the ablation itself for every run (budgets, seeds, phases, folders and "
                         f"expert counts come from --preset, --seeds, --budgets and --methods); drop it")
        if flag not in DISTILL_FLAGS | BUFFER_FLAGS:
            parser.error(f"{flag} is neither an ablation flag nor a flag of distill_ptm-st.py or buffer.py (further "
                         f"flags are passed to the stages that take them; see their --help)")
    args.distill_flags = flags_for(DISTILL_FLAGS, groups)
    args.buffer_flags = flags_for(BUFFER_FLAGS, groups)
    datasets = values_of(groups, "--dataset")
    args.builtin_data = not datasets
    # real photographs get the pretrained-encoder settings; any other --dataset runs the shapes settings on it
    real = bool(datasets) and datasets[-1] in REAL_SETTINGS
    if args.coresets and "none" in args.coresets and len(args.coresets) > 1:
        parser.error(f"--coresets {' '.join(args.coresets)}: 'none' means no coreset row; give it alone, or name the "
                     f"coresets to show")
    plan = (REAL_PRESETS if real else PRESETS)[args.preset]
    if real and args.preset != "smoke":
        plan = replace(plan, quickstart=REAL_SETTINGS[datasets[-1]])
    if args.iterations is not None:
        if args.iterations < 2:
            parser.error(f"--iterations {args.iterations}: give at least 2 (a one-phase method's total, split over "
                         f"the settings' phases when PTM-ST shares them)")
        plan = replace(plan, quickstart=replace(plan.quickstart, iterations=tuple(
            even_split(args.iterations, len(plan.quickstart.iterations)))))
    plan = replace(plan, seeds=tuple(args.seeds) if args.seeds else plan.seeds,
                   budgets=tuple(sorted(set(args.budgets))) if args.budgets else plan.budgets,
                   methods=tuple(m for m in ORDER if m in args.methods) if args.methods else plan.methods,
                   coresets=tuple(c for c in CORESETS if c in args.coresets) if args.coresets is not None
                   else plan.coresets, students=tuple(args.students or ()), lr_search=args.lr_search)
    plan = replace(plan, **{name: getattr(args, name) for name in PTMST_CHOICES if getattr(args, name) is not None})
    if not 0.0 <= plan.ptmst_ema < 1.0:
        parser.error(f"--ptmst_ema {plan.ptmst_ema}: an EMA decay lies in [0, 1) (0: the last iterate is the set)")
    if args.lr_search < 0:
        parser.error(f"--lr_search {args.lr_search}: give the number of configurations to try (0: no search)")
    searched = [g[0] for g in groups if g[0].split("=", 1)[0] in {f"--{name}" for name in SEARCHED}]
    if args.lr_search and searched:
        parser.error(f"{searched[0]} is what --lr_search searches: drop one of the two")
    unknown = [name for name in plan.students if not is_known_image_encoder(name)]
    if unknown:
        parser.error(unknown_image_encoder_message(unknown[0]).replace("--image_encoder", "--students"))
    smallest = min(plan.budgets)
    if smallest < 1:
        parser.error(f"--budgets {smallest}: a budget is a number of pairs, at least 1")
    if "ptmst" in plan.methods and plan.ptmst_layout == "even" and smallest < len(plan.quickstart.phases):
        parser.error(f"--budgets {smallest}: PTM-ST splits a budget over {len(plan.quickstart.phases)} phases, so "
                     f"every budget must be at least {len(plan.quickstart.phases)}")
    if plan.quickstart.builtin and max(plan.budgets) > plan.quickstart.num_train * 5:
        parser.error(f"--budgets {max(plan.budgets)} exceeds the {plan.quickstart.num_train * 5} training pairs")
    args.plan = plan
    return args


def main(argv: Optional[Sequence[str]] = None) -> Path:
    args = parse_args(argv)
    setup_logging()
    plan, s = args.plan, args.plan.quickstart
    folder = writable_folder(Path(args.workdir), "--workdir")
    work = Workdir(folder, SCRIPTS, launcher_of(args, folder))
    (work / "reports").mkdir(parents=True, exist_ok=True)
    # written in a folder of its own and renamed when complete: a report folder is never half written
    report = Path(tempfile.mkdtemp(prefix=".ablation_", suffix=".partial", dir=work / "reports"))
    (report / "images").mkdir()
    if args.builtin_data:  # otherwise --dataset, --image_root, --ann_root and the weights' flags say where
        generate_data(s, work)
    model = model_namespace(plan, work, args.distill_flags)
    check_budgets_fit(plan, work, model)
    # one job (the pretrained start, the experts, the shortcuts) that every distillation waits for
    folders: Dict[str, object] = work.launcher.run("experts", [Experts(
        plan, work.local(), model, args.buffer_flags, args.builtin_data)])[0]
    normal = folders["normal"]
    logged = work / "ablation_runs"
    searched = search_rates(plan, work, folders, logged, model, args.distill_flags) if plan.lr_search else {}
    records = distill_all(plan, work, folders, logged, model.dataset, args.distill_flags, searched)
    results, eval_seconds = evaluate_all(plan, work, records, model, normal)
    command = "bash sh/ablation.sh " + " ".join(argv if argv is not None else __import__("sys").argv[1:])
    export_runs(plan, work, records, results, model, report / "exports")
    write_report(plan, report, results, records, eval_seconds, command.strip(),
                 copy_images(records, report, plan.seeds[0]), model, searched)
    path = publish(report, work / "reports", report_stamp()) / "README.md"
    rows = report_rows(plan, results)
    print(f"\nreport: {path}\n\nval protocol, mean recall (%), mean ± std over seeds {list(plan.seeds)}\n"
          f"{table(plan, results, 'val', rows)}")
    return path


if __name__ == "__main__":
    run_script(main, outputs={"--workdir": "./ablation"},
               interrupted="interrupted: finished runs are kept in --workdir/ablation_runs and a cut run resumes: run "
                           "the same command again to go on.")
