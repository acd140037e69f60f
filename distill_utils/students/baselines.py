"""The reference rows' real pairs: random subsets (whole, or cut like the phases) and the coresets.

A reference row holds as many real training pairs as the distilled set it is compared with, with
identity similarity; ``random`` and ``random_split`` draw the same pairs (seed + ``RANDOM_DRAW``), so the
split row differs from the whole one only in how its students are trained.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import List, Optional, Sequence

import torch

from ..data import DataError
from ..data.context import DataContext
from ..distillation.synthetic import FrozenSubset
from ..experts import trajectories
from .coresets import CORESETS, expert_at_end, pair_embeddings, pairs_digest, rank_pairs, split_ranking
from .evaluation import union_of

log = logging.getLogger("ptmst.eval")


LABELS = {"ptmst": "PTM-ST", "mttvl": "MTT-VL", "lors": "LoRS", "amd": "AMD", "repblend": "RepBlend"}


BASELINE_LABELS = {"random": "random real subset", "random_split": "random real subset, split like the phases",
                   "herding": "herding coreset", "kcenter": "k-center coreset", "forgetting": "forgetting coreset"}


RANDOM_DRAW = 12345  # the random rows draw from seed + this, so the whole and the split rows share their pairs


def random_generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed + RANDOM_DRAW)


def real_subsets(data: DataContext, chunks: Sequence[Sequence[int]], lr_img: float,
                 lr_txt: float) -> List[FrozenSubset]:
    """Training pairs ``chunks`` (one list of pair indices per phase), test-time transform, identity similarity."""
    subsets = []
    for chunk in chunks:
        chunk = [int(i) for i in chunk]
        images = torch.stack([data.train[i][0] for i in chunk])
        subsets.append(FrozenSubset(images, data.train_text[chunk].clone(), torch.eye(len(chunk)), lr_img, lr_txt))
    return subsets


def check_enough_pairs(baseline: str, needed: int, available: int, what: str = "training pairs") -> None:
    if needed > available:
        raise DataError(f"the {baseline} baseline needs {needed} {what} but the dataset has {available}: drop "
                        f"--baseline {baseline} or use a larger training set")


def random_subsets(data: DataContext, sizes: Sequence[int], lr_img: float, lr_txt: float,
                   generator: torch.Generator) -> List[FrozenSubset]:
    """Random real training pairs; distinct across phases when the training set holds enough pairs,
    else distinct within each phase."""
    available = len(data.train)
    if sum(sizes) <= available:
        chunks = torch.randperm(available, generator=generator)[:sum(sizes)].split(list(sizes))
    else:
        check_enough_pairs("random", max(sizes), available, "distinct training pairs for one phase")
        log.warning("the training set has %d pairs, fewer than the %d the phases hold together: each phase's "
                    "random subset is drawn on its own, so they may share pairs", available, sum(sizes))
        chunks = [torch.randperm(available, generator=generator)[:size] for size in sizes]
    return real_subsets(data, [c.tolist() for c in chunks], lr_img, lr_txt)


class CoresetSelector:
    """Herding, k-center and forgetting selections of one training set, made with the first expert of
    ``expert_dir`` (a model of ``config``, the distiller's). The joint embeddings and the forgetting
    record are read once, however many budgets and seeds select from them."""

    def __init__(self, data: DataContext, expert_dir: Path, config, device: torch.device):
        self.data, self.expert_dir, self.config, self.device = data, Path(expert_dir), config, device
        self._embeddings = None
        self._expert = None
        self._forgetting: Optional[dict] = None

    def expert(self):
        if self._expert is None:
            self._expert, _ = expert_at_end(self.config, self.expert_dir, self.device)
        return self._expert

    def embeddings(self):
        if self._embeddings is None:
            model = self.expert()
            train = self.data.train
            self._embeddings = pair_embeddings(model, lambda path: train.transform(train.folder(path)),
                                               train.image_paths(), self.data.train_text, self.device)
        return self._embeddings

    def forgetting_record(self) -> dict:
        if self._forgetting is None:
            index = trajectories.TrajectoryBuffer(self.expert_dir).indices[0]
            train = self.data.train
            self._forgetting = trajectories.read_forgetting(self.expert_dir, index,
                                                            pairs_digest(train.image_paths(), train.captions))
        return self._forgetting

    def check(self, kind: str) -> None:
        """Read what ``kind`` selects with (the expert's folder and, for forgetting, its record) now, so a
        missing or foreign file stops the command before any student trains."""
        if kind == "forgetting":
            self.forgetting_record()
        else:
            self.expert()

    def subsets(self, kind: str, sizes: Sequence[int], lr_img: float, lr_txt: float, seed: int) -> List[FrozenSubset]:
        """``seed`` orders the forgetting counts that tie; herding and k-center do not depend on it."""
        check_enough_pairs(kind, sum(sizes), len(self.data.train))
        if kind == "forgetting":
            ranking = rank_pairs(kind, sum(sizes), forgetting=self.forgetting_record(), seed=seed)
        else:
            ranking = rank_pairs(kind, sum(sizes), embeddings=self.embeddings())
        return real_subsets(self.data, split_ranking(ranking, sizes), lr_img, lr_txt)


def check_baselines(baselines: Sequence[str], sizes: Sequence[int], available: int,
                    selector: Optional["CoresetSelector"]) -> None:
    """What every reference row needs, checked before any student trains: enough training pairs, and for
    the coresets a readable expert (and its forgetting record)."""
    for baseline in baselines:
        if baseline in ("random", "random_split"):
            check_enough_pairs(baseline, max(sizes), available, "distinct training pairs for one phase")
        if baseline in CORESETS:
            check_enough_pairs(baseline, sum(sizes), available)
            selector.check(baseline)


def baseline_subsets(baseline: str, data: DataContext, sizes: Sequence[int], lr_img: float, lr_txt: float, seed: int,
                     selector: Optional["CoresetSelector"]) -> List[FrozenSubset]:
    """The real pairs of a reference row: one subset of ``sum(sizes)`` pairs, or for ``random_split`` the same
    random pairs cut into ``sizes``."""
    total = [sum(sizes)]
    if baseline == "random" and sum(sizes) > len(data.train) >= max(sizes):
        log.warning("the distilled set holds %d pairs, more than the %d training pairs: the random row draws each "
                    "phase's share on its own (pairs may repeat) and trains them at once", sum(sizes), len(data.train))
        return [union_of(random_subsets(data, sizes, lr_img, lr_txt, random_generator(seed)))]
    if baseline in ("random", "random_split"):
        return random_subsets(data, sizes if baseline == "random_split" else total, lr_img, lr_txt,
                              random_generator(seed))
    return selector.subsets(baseline, total, lr_img, lr_txt, seed)


def baseline_label(baseline: str, sizes: Sequence[int]) -> str:
    if baseline == "random_split":
        return f"random real subset, split {' + '.join(map(str, sizes))}"
    return BASELINE_LABELS[baseline]
