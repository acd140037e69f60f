"""Training fresh students on distilled subsets and measuring their retrieval recall.

``paper`` protocol (the reference's, kept so paper tables reproduce, quirks included):
  * one SGD (momentum 0.9, weight decay 5e-4) and one x0.1 schedule at epoch epochs//2 + 1 that
    runs on across phases (so the decay fires inside phase 0);
  * every phase trains at the *current* (last) phase's learned step sizes;
  * subsets 0..k are trained in order, epochs + 1 each; recall is measured on the test split at 11
    evenly spaced epochs per subset and the best r_mean over all of them is reported.
``val`` picks the measurement point on the val split and reports test recall there (and at the
last epoch). ``phase_lr=own`` trains each phase at its own learned step sizes.

``schedule`` (the paper's is ``paper``, the default):
  * ``restart``: the subsets still train one after the other, but the x0.1 decay restarts with each
    subset (it fires at epoch epochs//2 + 1 of every subset, not once inside the first);
  * ``union``: the subsets train at once, as one set of all their pairs whose similarity matrix is
    block-diagonal over the phases (pairs of different phases are unrelated), epochs + 1 epochs at the
    last phase's step sizes with one decay, measured as a single subset.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from networks import DualEncoderConfig

from ..runtime.errors import UsageError
from ..distillation.losses import MultilabelContrastiveLoss
from ..runtime.progress import progress
from .retrieval import RetrievalBenchmark
from ..runtime.runlog import seeded
from ..distillation.synthetic import FrozenSubset

log = logging.getLogger("ptmst.eval")
METRIC_KEYS = ("img_r1", "img_r5", "img_r10", "txt_r1", "txt_r5", "txt_r10", "r_mean")


@dataclass(frozen=True)
class EvalSettings:
    epochs: int = 100            # --epoch_eval_train
    batch_train: int = 128
    num_eval: int = 5
    loss_type: str = "WBCE"
    protocol: str = "paper"      # paper | val
    phase_lr: str = "current"    # current | own
    seed: int = 0
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "paper"      # paper | restart | union

    def __post_init__(self):
        problem = schedule_problem(self.schedule, self.phase_lr)
        if problem:
            raise UsageError(problem)


SCHEDULES = ("paper", "restart", "union")


def schedule_problem(schedule: str, phase_lr: str) -> Optional[str]:
    """Why a schedule and step-size choice cannot go together (None when they can)."""
    if schedule not in SCHEDULES:
        return f"--student_schedule {schedule!r} is not one of {', '.join(SCHEDULES)}"
    if schedule == "union" and phase_lr == "own":
        return ("--student_schedule union trains every phase's pairs in one batch stream, so each phase cannot "
                "have its own step sizes: drop --phase_lr own (union uses the last phase's, as the paper's "
                "schedule does), or choose --student_schedule paper or restart")
    return None


@dataclass
class StudentRun:
    selected: Dict[str, float]   # test metrics at the selected measurement point
    last: Dict[str, float]       # test metrics at the last measurement
    history: List[dict] = field(default_factory=list)


def measurement_epochs(epochs: int) -> List[int]:
    """11 evenly spaced epochs in 0..epochs (every epoch when there are fewer than 10)."""
    if epochs < 10:
        return list(range(epochs + 1))
    return sorted({round(i * epochs / 10) for i in range(11)})


def decay_factor(global_epoch: int, epochs: int) -> float:
    """MultiStepLR(milestones=[epochs // 2 + 1], gamma=0.1) stepped once per epoch, across phases."""
    return 0.1 if global_epoch >= epochs // 2 + 1 else 1.0


def union_of(subsets: Sequence[FrozenSubset]) -> FrozenSubset:
    """All subsets as one: their pairs in phase order, similarity block-diagonal over the phases, the
    last phase's step sizes."""
    return FrozenSubset(torch.cat([s.images for s in subsets]), torch.cat([s.texts for s in subsets]),
                        torch.block_diag(*[s.similarity for s in subsets]), subsets[-1].lr_img, subsets[-1].lr_txt)


def phase_step_sizes(subsets: Sequence[FrozenSubset], phase: int, phase_lr: str):
    source = subsets[-1] if phase_lr == "current" else subsets[phase]
    return source.lr_img, source.lr_txt


def student_seed(seed: int, run: int) -> int:
    """The seed of student ``run`` of an evaluation seeded ``seed``: a hash of the pair, so students of
    different seeds never coincide (``seed + run`` made seeds 0, 1, 2 share students 1 and 2)."""
    return int(np.random.SeedSequence([seed, run]).generate_state(1, np.uint64)[0] >> 1)


def student_inputs(model, images: torch.Tensor, chunk: int = 256):
    """What the student's batches are drawn from: with a frozen image encoder its features of the set,
    computed once (they never change while the heads train; the encoder has no dropout or batch
    statistics), else the images themselves. Returns ``(inputs, are_features)``."""
    if model.image_trainable:
        return images, False
    with torch.no_grad():
        return torch.cat([model.image_encoder(images[s:s + chunk]) for s in range(0, len(images), chunk)]), True


def fresh_student(config: DualEncoderConfig, seed: int, device: torch.device, momentum: float,
                  weight_decay: float):
    """A new student in training mode and its SGD over the image and text sides (param groups 0 and 1,
    whose rates the caller sets every epoch)."""
    model = config.build(seed=seed).to(device).train()
    groups = [{"params": model.side_parameters("image"), "lr": 0.0},
              {"params": model.side_parameters("text"), "lr": 0.0}]
    return model, torch.optim.SGD(groups, lr=0.0, momentum=momentum, weight_decay=weight_decay)


def train_student(subsets: Sequence[FrozenSubset], config: DualEncoderConfig, settings: EvalSettings,
                  test: RetrievalBenchmark, val: Optional[RetrievalBenchmark], run: int,
                  device: torch.device) -> StudentRun:
    """One fresh student trained on ``subsets`` in order; see the module docstring for the protocol."""
    seed = student_seed(settings.seed, run)
    if settings.schedule == "union":
        subsets = [union_of(subsets)]
    with seeded(seed, device):  # dropout masks: reproducible, and the caller's RNG stream is untouched
        model, optimizer = fresh_student(config, seed, device, settings.momentum, settings.weight_decay)
        criterion = MultilabelContrastiveLoss(settings.loss_type)
        generator = torch.Generator().manual_seed(seed)
        checkpoints = set(measurement_epochs(settings.epochs))
        history, best_score, selected, last, global_epoch, diverged = [], -np.inf, None, None, 0, False
        for phase, subset in enumerate(subsets):
            lr_img, lr_txt = phase_step_sizes(subsets, phase, settings.phase_lr)
            images, texts = subset.images.to(device), subset.texts.to(device)
            images, on_features = student_inputs(model, images)
            similarity = subset.similarity.to(device)
            for epoch in range(settings.epochs + 1):
                factor = decay_factor(epoch if settings.schedule == "restart" else global_epoch, settings.epochs)
                optimizer.param_groups[0]["lr"] = lr_img * factor
                optimizer.param_groups[1]["lr"] = lr_txt * factor
                for idx in torch.randperm(len(subset), generator=generator).split(settings.batch_train):
                    idx = idx.to(device)
                    loss = criterion(model(images[idx], texts[idx], images_are_features=on_features),
                                     similarity[idx][:, idx])
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                global_epoch += 1
                if not diverged and not torch.isfinite(loss):
                    diverged = True  # its recall is then measured as it is: NaN scores rank as misses
                    log.warning("student %d diverged (loss %s) training on phase %d at epoch %d: the set or its "
                                "learned step sizes are too large to train on; its recall counts as measured",
                                run, loss.item(), phase, epoch)
                if epoch not in checkpoints:
                    continue
                record = {"phase": phase, "epoch": epoch, "lr_img": lr_img * factor, "lr_txt": lr_txt * factor,
                          "test": test.evaluate(model)}
                if settings.protocol == "val":
                    record["val"] = val.evaluate(model)
                score = record["val" if settings.protocol == "val" else "test"]["r_mean"]
                history.append(record)
                last = record["test"]
                if score > best_score:
                    best_score, selected = score, record["test"]
        return StudentRun(selected=selected, last=last, history=history)


def summarise(runs: Sequence[StudentRun]) -> dict:
    """Mean and standard deviation (numpy's, ddof=0, as the reference) over runs."""
    out = {"num_runs": len(runs)}
    for name, pick in (("selected", lambda r: r.selected), ("last", lambda r: r.last)):
        values = {k: np.array([pick(r)[k] for r in runs], dtype=np.float64) for k in pick(runs[0])}
        out[name] = {"mean": {k: float(v.mean()) for k, v in values.items()},
                     "std": {k: float(v.std()) for k, v in values.items()}}
    return out


def evaluate_subsets(subsets: Sequence[FrozenSubset], config: DualEncoderConfig, settings: EvalSettings,
                     test: RetrievalBenchmark, val: Optional[RetrievalBenchmark], device: torch.device,
                     desc: str = "student evaluation") -> dict:
    if settings.protocol == "val" and val is None:
        raise ValueError("the val protocol needs the val split's benchmark")
    for subset in subsets:
        for name, value in (("lr_img", subset.lr_img), ("lr_txt", subset.lr_txt)):
            if not np.isfinite(value) or value < 0:
                raise FloatingPointError(f"learned step size {name} = {value} cannot train a student; "
                                         f"set --clamp_lr to keep step sizes positive")
    runs = [train_student(subsets, config, settings, test, val, run, device)
            for run in progress(range(settings.num_eval), desc=desc, unit="student", leave=False, inner=True)]
    summary = summarise(runs)
    summary["runs"] = [{"selected": r.selected, "last": r.last, "history": r.history} for r in runs]
    return summary


def format_table(rows: Dict[str, dict]) -> str:
    """Markdown table, one row per method: mean ± std of each metric."""
    header = "| method | Img R@1 | Img R@5 | Img R@10 | Txt R@1 | Txt R@5 | Txt R@10 | Mean |"
    lines = [header, "|" + "---|" * 8]
    for method, summary in rows.items():
        mean, std = summary["mean"], summary["std"]
        cells = [f"{mean[k]:.2f} ± {std[k]:.2f}" for k in METRIC_KEYS]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def select_on(history: Sequence[dict], split: str) -> Dict[str, float]:
    """Test recall at the first measurement whose ``split`` r_mean is highest: ``"test"`` is the
    paper protocol's choice, ``"val"`` the val protocol's."""
    best = max(range(len(history)), key=lambda i: (history[i][split]["r_mean"], -i))
    return history[best]["test"]


def both_protocols(runs: Sequence[StudentRun]) -> Dict[str, dict]:
    """``{"val": summary, "paper": summary}`` of students evaluated under the val protocol (each of
    whose measurements holds test and val recall), so one set of students gives both columns."""
    out = {protocol: summarise([StudentRun(select_on(r.history, split), r.last, r.history) for r in runs])
           for protocol, split in (("val", "val"), ("paper", "test"))}
    # the val split's own recall at the selected points: what a choice made on val may rank by
    out["val"]["selected_val_r_mean"] = float(np.mean([max(h["val"]["r_mean"] for h in r.history) for r in runs]))
    return out
