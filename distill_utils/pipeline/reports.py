"""A sweep's tables (the papers' layout: budgets as column groups), plots and report folder."""
from __future__ import annotations

import datetime
import statistics
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from ..outputs.plots import grouped_bars, lines_with_error_bars
from .sweep import FROZEN_RANDOM, FULL_DATA, ORDER, RANDOM_SPLIT, Plan


def report_rows(plan: Plan, results: Dict) -> List[str]:
    """The table's rows in order, those of them that ``results`` holds (forgetting may be left out)."""
    s = plan.quickstart
    rows = ([m for m in ORDER if m in plan.methods] + ["random"]
            + ([FROZEN_RANDOM] if "repblend" in plan.methods and s.image_trainable else [])
            + ([RANDOM_SPLIT] if "ptmst" in plan.methods else []) + list(plan.coresets)
            + ([FULL_DATA] if plan.full_data else []))
    measured = {key[0] for key in results}
    return [row for row in rows if row in measured]


def cross_rows(plan: Plan, results: Dict) -> List[str]:
    return [row for row in report_rows(plan, results) if plan.students and (row, plan.budgets[0], plan.seeds[0],
                                                                            plan.students[0]) in results]


def over_seeds(results: Dict, method: str, budget: int, seeds: Sequence[int], protocol: str,
               metric: str = "r_mean", student: Optional[str] = None) -> Tuple[float, float]:
    """Mean and (population) std over seeds of each seed's mean ``metric`` over its students."""
    values = [results[(method, budget, seed) + ((student,) if student else ())][protocol]["selected"]["mean"][metric]
              for seed in seeds]
    return statistics.fmean(values), statistics.pstdev(values)


def table(plan: Plan, results: Dict, protocol: str, rows: Sequence[str]) -> str:
    lines = ["| method | " + " | ".join(f"{b} pairs" for b in plan.budgets) + " |",
             "|---|" + "---|" * len(plan.budgets)]
    for method in rows:
        cells = ["{:.2f} ± {:.2f}".format(*over_seeds(results, method, b, plan.seeds, protocol)) for b in plan.budgets]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# the papers' column order: image retrieval (text -> image) then text retrieval (image -> text)
PAPER_COLUMNS = (("IR@1", "img_r1"), ("IR@5", "img_r5"), ("IR@10", "img_r10"), ("TR@1", "txt_r1"),
                 ("TR@5", "txt_r5"), ("TR@10", "txt_r10"), ("mean", "r_mean"))


def paper_table(plan: Plan, results: Dict, protocol: str, rows: Sequence[str], student: Optional[str] = None) -> str:
    """Budgets as column groups, each IR@1/5/10, TR@1/5/10 and their mean (mean ± std over seeds)."""
    header = ["method"] + [f"{b} pairs: {name}" if k == 0 else name for b in plan.budgets
                           for k, (name, _) in enumerate(PAPER_COLUMNS)]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---|" * (len(header) - 1)]
    for row in rows:
        cells = ["{:.1f} ± {:.1f}".format(*over_seeds(results, row, b, plan.seeds, protocol, key, student))
                 for b in plan.budgets for _, key in PAPER_COLUMNS]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def cross_table(plan: Plan, results: Dict, protocol: str, rows: Sequence[str]) -> str:
    """Mean recall of each row's sets trained by the distiller's model and by each listed student."""
    columns = [(None, "distiller's model")] + [(name, name) for name in plan.students]
    lines = ["| method | " + " | ".join(f"{b} pairs: {label}" if k == 0 else label for b in plan.budgets
                                      for k, (_, label) in enumerate(columns)) + " |",
             "|---|" + "---|" * (len(columns) * len(plan.budgets))]
    for row in rows:
        cells = ["{:.2f} ± {:.2f}".format(*over_seeds(results, row, b, plan.seeds, protocol, student=student))
                 for b in plan.budgets for student, _ in columns]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def draw_plots(plan: Plan, results: Dict, report: Path, rows: Sequence[str]) -> List[str]:
    """recall_vs_budget.png, and cross_architecture.png with students; returns the file names."""
    lines_with_error_bars(report / "recall_vs_budget.png", plan.budgets,
                          {row: [over_seeds(results, row, b, plan.seeds, "val") for b in plan.budgets] for row in rows},
                          "synthetic pairs", "mean recall (%), val protocol", "mean ± std over seeds")
    names = ["recall_vs_budget.png"]
    crossed = cross_rows(plan, results)
    if crossed:
        budget = plan.budgets[-1]
        series = {label: [over_seeds(results, row, budget, plan.seeds, "val", student=student) for row in crossed]
                  for student, label in [(None, "distiller's model")] + [(n, n) for n in plan.students]}
        grouped_bars(report / "cross_architecture.png", crossed, series, "mean recall (%), val protocol",
                     f"{budget} pairs: each set trained by each student")
        names.append("cross_architecture.png")
    return names


def report_stamp() -> str:
    return f"{datetime.datetime.now():%Y%m%d_%H%M%S}"


def publish(partial: Path, reports: Path, stamp: str, prefix: str = "ablation") -> Path:
    """Rename the finished ``partial`` folder to ``reports/PREFIX_STAMP`` (``_2``, ``_3``, ... when
    another call of the same second took that name: a rename onto a folder with files fails)."""
    for number in range(1, 1000):
        final = reports / (f"{prefix}_{stamp}" if number == 1 else f"{prefix}_{stamp}_{number}")
        if final.exists():
            continue
        try:
            partial.rename(final)
            return final
        except OSError:
            continue  # taken between the check and the rename
    raise FileExistsError(f"{reports}: {prefix}_{stamp} and 998 numbered variants exist; move old reports away")
