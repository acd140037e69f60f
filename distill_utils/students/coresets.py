"""Coreset selection of real training pairs: the baselines the papers' tables put beside distilled sets.

* ``herding`` (Welling 2009, as iCaRL uses it): greedily add the pair that brings the mean of the
  chosen pairs' joint embeddings closest to the mean of all pairs.
* ``kcenter`` (Sener & Savarese 2018, greedy 2-approximation): start from the pair nearest the mean,
  then repeatedly add the pair farthest from every pair chosen so far.
* ``forgetting`` (Toneva et al. 2019): count, over an expert's training, how often each pair goes
  from retrieved to not retrieved at its presentations; keep the most-forgotten pairs, with pairs
  never retrieved at all ranked first (forgotten "infinitely often", as Toneva et al. rank them).

A pair's joint embedding (VL-Distill's adaptation to image-text data) is its image embedding and its
text embedding under a model trained on the full data, each normalised, side by side. Every function
returns a ranking (a list of training-pair indices, best first); a budget of several phases takes
consecutive chunks of it (:func:`split_ranking`).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable, List, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..experts import trajectories

CORESETS = ("herding", "kcenter", "forgetting")


def herding(features: torch.Tensor, count: int) -> List[int]:
    """``count`` rows of ``features`` (N, D), chosen greedily so that the running mean of the chosen rows
    stays nearest the mean of all rows (ties: the lowest index). Computed in float64."""
    features = features.double()
    target = features.mean(dim=0)
    chosen: List[int] = []
    total = torch.zeros_like(target)
    available = torch.ones(len(features), dtype=torch.bool)
    for step in range(1, min(count, len(features)) + 1):
        distance = ((total + features) / step - target).norm(dim=1)
        distance[~available] = float("inf")
        best = int(torch.argmin(distance))
        chosen.append(best)
        total += features[best]
        available[best] = False
    return chosen


def k_center(features: torch.Tensor, count: int) -> List[int]:
    """Greedy farthest-point cover of ``features`` (N, D): the first center is the row nearest the mean,
    each next one the row whose Euclidean distance to its nearest center is largest (ties: the lowest
    index). Computed in float64."""
    features = features.double()
    if count <= 0 or len(features) == 0:
        return []
    first = int(torch.argmin((features - features.mean(dim=0)).norm(dim=1)))
    chosen = [first]
    nearest = (features - features[first]).norm(dim=1)
    while len(chosen) < min(count, len(features)):
        gaps = nearest.clone()
        gaps[chosen] = -1.0
        best = int(torch.argmax(gaps))
        chosen.append(best)
        nearest = torch.minimum(nearest, (features - features[best]).norm(dim=1))
    return chosen


class ForgettingTracker:
    """Forgetting events of every training pair, recorded at each presentation in a training batch.

    A pair counts as retrieved at a presentation when, within its batch, its image scores its own
    caption at least as high as any other caption and its caption scores its own image at least as high
    as any other image (``>=``, so a batch holding two captions of one image does not count a tie as a
    miss). An event is a presentation that misses after one that retrieved."""

    def __init__(self, num_pairs: int):
        self.events = np.zeros(num_pairs, dtype=np.int64)
        self.learned = np.zeros(num_pairs, dtype=bool)
        self.previous = np.zeros(num_pairs, dtype=bool)
        self.presentations = np.zeros(num_pairs, dtype=np.int64)

    @staticmethod
    def retrieved_in_batch(logits: torch.Tensor) -> torch.Tensor:
        """(B,) bool of a batch's square logits (image rows, caption columns, pair m at (m, m))."""
        logits = logits.detach().float()
        own = logits.diagonal()
        return (own >= logits.max(dim=1).values) & (own >= logits.max(dim=0).values)

    def update(self, pair_indices: torch.Tensor, logits: torch.Tensor) -> None:
        self.record(pair_indices.cpu().numpy(), self.retrieved_in_batch(logits).cpu().numpy())

    def record(self, pair_indices: np.ndarray, retrieved: np.ndarray) -> None:
        """One presentation of each listed pair (each at most once per call) and whether it was retrieved."""
        pair_indices = np.asarray(pair_indices, dtype=np.int64)
        retrieved = np.asarray(retrieved, dtype=bool)
        self.events[pair_indices] += self.previous[pair_indices] & ~retrieved
        self.learned[pair_indices] |= retrieved
        self.previous[pair_indices] = retrieved
        self.presentations[pair_indices] += 1

    def as_record(self, digest: str) -> dict:
        return {"format": "forgetting-events", "version": 1, "pairs": len(self.events), "pairs_digest": digest,
                "events": self.events.tolist(), "learned": self.learned.tolist(),
                "presentations": self.presentations.tolist()}


def forgetting_ranking(events: Sequence[int], learned: Sequence[bool], count: int, seed: int) -> List[int]:
    """The ``count`` most-forgotten pairs: never-learned pairs first, then by events, most first; pairs
    that tie are ordered by a random permutation drawn from ``seed`` (so equal counts do not favour
    low indices, which in Flickr-style data are the captions of the first images)."""
    events = np.asarray(events, dtype=np.float64)
    score = np.where(np.asarray(learned, dtype=bool), events, np.inf)
    shuffled = np.random.default_rng(seed).permutation(len(score))
    order = shuffled[np.argsort(-score[shuffled], kind="stable")]
    return [int(i) for i in order[:count]]


def split_ranking(ranking: Sequence[int], sizes: Sequence[int]) -> List[List[int]]:
    """Consecutive chunks of ``ranking``, one per phase size."""
    if sum(sizes) > len(ranking):
        raise ValueError(f"a ranking of {len(ranking)} pairs cannot fill phases of {list(sizes)} pairs")
    bounds = np.cumsum([0, *sizes])
    return [list(ranking[bounds[k]:bounds[k + 1]]) for k in range(len(sizes))]


def pairs_digest(images: Sequence[str], captions: Sequence[str]) -> str:
    """A digest of a training set's pairs, in order: a sidecar of per-pair counts belongs to exactly one."""
    digest = hashlib.sha1()
    for image, caption in zip(images, captions):
        digest.update(f"{image}\t{caption}\n".encode("utf-8"))
    return digest.hexdigest()


@dataclass(frozen=True)
class PairEmbeddings:
    image: torch.Tensor  # (pairs, D) normalised
    text: torch.Tensor   # (pairs, D) normalised

    def joint(self) -> torch.Tensor:
        return torch.cat([self.image, self.text], dim=1)


@torch.no_grad()
def pair_embeddings(model, load_image: Callable[[str], torch.Tensor], pair_images: Sequence[str],
                    text_features: torch.Tensor, device: torch.device, batch_size: int = 256) -> PairEmbeddings:
    """Each pair's normalised image and text embedding under ``model`` (in eval mode). ``load_image``
    gives an image path's (C, H, W) tensor; each distinct image is decoded and encoded once (an image
    with five captions), a batch at a time, so the training images are never all in memory."""
    was_training = model.training
    model.eval()
    try:
        names = list(dict.fromkeys(pair_images))
        encoded = []
        for start in range(0, len(names), batch_size):
            batch = torch.stack([load_image(n) for n in names[start:start + batch_size]]).to(device)
            encoded.append(model.encode_image(batch).cpu())
        position = {name: k for k, name in enumerate(names)}
        image = torch.cat(encoded)[torch.tensor([position[p] for p in pair_images], dtype=torch.long)]
        text = torch.cat([model.encode_text(text_features[s:s + 4096].to(device)).cpu()
                          for s in range(0, len(text_features), 4096)])
    finally:
        model.train(was_training)
    return PairEmbeddings(F.normalize(image.double(), dim=1), F.normalize(text.double(), dim=1))


def expert_at_end(config, folder, device: torch.device):
    """A model of ``config`` holding the final snapshot of the first expert (lowest index) in ``folder``,
    and that index: the "model trained on the full data" of herding and k-center."""
    model = config.build(seed=0)
    expected = trajectories.ExpectedShapes(
        image=trajectories.parameter_shapes(model.side_named_parameters("image")),
        text=trajectories.parameter_shapes(model.side_named_parameters("text")))
    buffer = trajectories.TrajectoryBuffer(folder, expected)
    index = buffer.indices[0]
    expert = buffer.experts_in_file(index)[0]
    trajectories.load_snapshot(model, expert, expert.num_snapshots - 1)
    return model.to(device), index


def rank_pairs(kind: str, count: int, embeddings: PairEmbeddings = None, forgetting: dict = None,
               seed: int = 0) -> List[int]:
    """The first ``count`` training pairs of coreset ``kind``'s ranking."""
    if kind == "herding":
        return herding(embeddings.joint(), count)
    if kind == "kcenter":
        return k_center(embeddings.joint(), count)
    if kind == "forgetting":
        return forgetting_ranking(forgetting["events"], forgetting["learned"], count, seed)
    raise ValueError(f"unknown coreset {kind!r}; one of {CORESETS}")
