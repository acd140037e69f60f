"""The full training set as a reference row: an upper bound, trained to convergence.

Every pair of the training split, identity similarity, trained by fresh students under the student
recipe (SGD, momentum 0.9, weight decay 5e-4, one x0.1 decay at epoch epochs//2 + 1, recall measured
at 11 evenly spaced epochs). Epochs, learning rate and batch are chosen on the val split: one student
per configuration of the grid, at a seed of the search's own, scored by its best val r_mean; the
chosen configuration then trains ``num_eval`` students, and each reports test recall at its
measurement chosen on val (and, for the paper protocol, the best test measurement).

The students read the training pairs from memory when their images fit ``memory_limit_bytes`` (with a
frozen image encoder, its features of them, computed once per student), else stream them from the
dataset each epoch.
"""
from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader

from networks import DualEncoderConfig

from .evaluation import (StudentRun, both_protocols, decay_factor, fresh_student, measurement_epochs, select_on,
                         student_seed)
from ..distillation.losses import MultilabelContrastiveLoss
from ..runtime.progress import progress
from .retrieval import RetrievalBenchmark
from ..runtime.runlog import seeded

log = logging.getLogger("ptmst.eval")
SEARCH_SEED = 1000  # the grid's students never share a seed with a reported one


@dataclass(frozen=True)
class FullDataSettings:
    epochs: Tuple[int, ...] = (10, 30, 100)
    lr_scales: Tuple[float, ...] = (0.5, 1.0, 2.0)  # times the baseline rates (lr_img, lr_txt)
    batches: Tuple[int, ...] = (32, 128)
    lr_img: float = 0.1
    lr_txt: float = 0.1
    num_eval: int = 5
    loss_type: str = "WBCE"
    seed: int = 0
    momentum: float = 0.9
    weight_decay: float = 5e-4
    num_workers: int = 0
    memory_limit_bytes: int = 2 << 30

    def grid(self) -> List[Tuple[int, float, int]]:
        """(epochs, lr scale, batch) of every configuration, in a fixed order."""
        return list(itertools.product(self.epochs, self.lr_scales, self.batches))


@dataclass(frozen=True)
class Recipe:
    epochs: int
    lr_img: float
    lr_txt: float
    batch: int


def recipe_of(settings: FullDataSettings, config: Tuple[int, float, int]) -> Recipe:
    epochs, scale, batch = config
    return Recipe(epochs, settings.lr_img * scale, settings.lr_txt * scale, batch)


class PairSource:
    """The training pairs as a student's batches are drawn from them: images (or a frozen encoder's
    features of them) in memory, or decoded from the dataset batch by batch."""

    def __init__(self, dataset, texts: torch.Tensor, device: torch.device, memory_limit_bytes: int, num_workers: int):
        self.dataset, self.texts, self.device, self.num_workers = dataset, texts, device, num_workers
        first = dataset[0][0]
        self.in_memory = first.numel() * first.element_size() * len(dataset) <= memory_limit_bytes
        self._images: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return len(self.dataset)

    def images(self) -> torch.Tensor:
        if self._images is None:
            self._images = torch.stack([self.dataset[i][0] for i in range(len(self.dataset))])
        return self._images

    def student_view(self, model) -> "StudentView":
        """What one student trains on: with a frozen encoder in memory, its features of every image (they
        never change while the heads train), else the images."""
        if not self.in_memory:
            return StudentView(self, None, False)
        images = self.images()
        if model.image_trainable:
            return StudentView(self, images.to(self.device), False)
        with torch.no_grad():
            features = torch.cat([model.image_encoder(images[s:s + 256].to(self.device))
                                  for s in range(0, len(images), 256)])
        return StudentView(self, features, True)


@dataclass
class StudentView:
    source: PairSource
    inputs: Optional[torch.Tensor]  # None: streamed from the dataset
    are_features: bool

    def batches(self, model, batch: int,
                generator: torch.Generator) -> Iterator[Tuple[torch.Tensor, torch.Tensor, bool]]:
        """One epoch of ``(image inputs, text features, inputs are features)`` in a random order."""
        device = self.source.device
        if self.inputs is not None:
            for idx in torch.randperm(len(self.source), generator=generator).split(batch):
                yield self.inputs[idx.to(self.inputs.device)], self.source.texts[idx].to(device), self.are_features
            return
        order = torch.randperm(len(self.source), generator=generator).tolist()
        loader = DataLoader(self.source.dataset, batch_size=batch, sampler=order, num_workers=self.source.num_workers,
                            generator=torch.Generator())  # leaves the global generator (dropout) alone
        for images, idx in loader:
            images = images.to(device)
            if not model.image_trainable:
                with torch.no_grad():
                    images = model.image_encoder(images)
            yield images, self.source.texts[idx].to(device), not model.image_trainable


def train_on_all(source: PairSource, config: DualEncoderConfig, recipe: Recipe, settings: FullDataSettings,
                 test: RetrievalBenchmark, val: RetrievalBenchmark, seed: int, device: torch.device) -> StudentRun:
    """One fresh student on every training pair; every measurement holds test and val recall."""
    history = fit_student(source, config, recipe, settings, seed, device,
                          lambda model: {"test": test.evaluate(model), "val": val.evaluate(model)})[1]
    return StudentRun(selected=select_on(history, "val"), last=history[-1]["test"], history=history)


def fit_student(source: PairSource, config: DualEncoderConfig, recipe: Recipe, settings: FullDataSettings,
                seed: int, device: torch.device, measure) -> Tuple[torch.nn.Module, List[dict]]:
    """The trained student and ``{"epoch": e, **measure(model)}`` at each measurement epoch."""
    with seeded(seed, device):
        model, optimizer = fresh_student(config, seed, device, settings.momentum, settings.weight_decay)
        criterion = MultilabelContrastiveLoss(settings.loss_type)
        generator = torch.Generator().manual_seed(seed)
        view = source.student_view(model)
        checkpoints, history = set(measurement_epochs(recipe.epochs)), []
        for epoch in range(recipe.epochs + 1):
            factor = decay_factor(epoch, recipe.epochs)
            optimizer.param_groups[0]["lr"] = recipe.lr_img * factor
            optimizer.param_groups[1]["lr"] = recipe.lr_txt * factor
            for inputs, texts, on_features in view.batches(model, recipe.batch, generator):
                target = torch.eye(len(texts), device=device)
                loss = criterion(model(inputs, texts, images_are_features=on_features), target)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            if epoch in checkpoints:
                history.append({"epoch": epoch, **measure(model)})
        return model, history


def choose_recipe(source: PairSource, config: DualEncoderConfig, settings: FullDataSettings,
                  test: RetrievalBenchmark, val: RetrievalBenchmark, device: torch.device) -> Tuple[int, List[dict]]:
    """The grid's configuration whose search student reaches the highest val r_mean; (index, every score)."""
    grid, scores = settings.grid(), []
    for config_tuple in progress(grid, desc="full data: choosing epochs, lr, batch on val", unit="config",
                                 leave=False, inner=True):
        recipe = recipe_of(settings, config_tuple)
        run = train_on_all(source, config, recipe, settings, test, val, student_seed(SEARCH_SEED, 0), device)
        score = max(h["val"]["r_mean"] for h in run.history)
        scores.append({"epochs": recipe.epochs, "lr_img": recipe.lr_img, "lr_txt": recipe.lr_txt,
                       "batch": recipe.batch, "val_r_mean": score if np.isfinite(score) else float("nan")})
    finite = [k for k, s in enumerate(scores) if np.isfinite(s["val_r_mean"])]
    if not finite:
        raise FloatingPointError("every full-data configuration diverged: lower --lr_teacher_img/--lr_teacher_txt "
                                 "or --full_lr_scale")
    chosen = max(finite, key=lambda k: (scores[k]["val_r_mean"], -k))
    log.info("full data: chose %d epochs, lr %.4g/%.4g, batch %d (val r_mean %.2f) from %d configurations",
             scores[chosen]["epochs"], scores[chosen]["lr_img"], scores[chosen]["lr_txt"], scores[chosen]["batch"],
             scores[chosen]["val_r_mean"], len(grid))
    return chosen, scores


def pair_source(data, settings: FullDataSettings, device: torch.device) -> PairSource:
    return PairSource(data.train, data.train_text, device, settings.memory_limit_bytes, settings.num_workers)


def recipe_students(source: PairSource, config: DualEncoderConfig, recipe: Recipe, settings: FullDataSettings,
                    test: RetrievalBenchmark, val: RetrievalBenchmark, device: torch.device) -> Dict[str, dict]:
    """``{"val": summary, "paper": summary}`` of ``settings.num_eval`` students (seeded by ``settings.seed``)."""
    runs = [train_on_all(source, config, recipe, settings, test, val, student_seed(settings.seed, k), device)
            for k in progress(range(settings.num_eval), desc="full data: students", unit="student", leave=False,
                              inner=True)]
    return both_protocols(runs)


def full_data_protocols(data, config: DualEncoderConfig, settings: FullDataSettings, test: RetrievalBenchmark,
                        val: Optional[RetrievalBenchmark], device: torch.device) -> Dict[str, object]:
    """The recipe chosen on val, then its students: ``{"val": summary, "paper": summary, "search": scores,
    "chosen": index}``."""
    if val is None:
        raise ValueError("the full-data row chooses its recipe on the val split: load the val split's benchmark")
    source = pair_source(data, settings, device)
    chosen, scores = choose_recipe(source, config, settings, test, val, device)
    found = recipe_students(source, config, recipe_of(settings, settings.grid()[chosen]), settings, test, val, device)
    return {**found, "search": scores, "chosen": chosen}
