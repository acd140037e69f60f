"""Image-text retrieval recall, ranked without per-row Python loops."""
from __future__ import annotations

from typing import Mapping, Sequence, Union

import numpy as np
import torch

_CHUNK = 64  # rows compared at once: a chunk of booleans that stays in cache


def _as_tensor(scores) -> torch.Tensor:
    if isinstance(scores, np.ndarray):
        scores = torch.from_numpy(scores)
    scores = scores.detach()
    return scores if scores.dtype in (torch.float32, torch.float64) else scores.float()


def _as_list(mapping, count: int, name: str) -> list:
    """The authors' datasets give ``txt2img`` / ``img2txt`` as dicts keyed 0..n-1; ours give lists."""
    if not isinstance(mapping, Mapping):
        return list(mapping)
    if sorted(mapping) != list(range(count)):
        raise ValueError(f"{name} must have the keys 0..{count - 1} (one per row of the scores)")
    return [mapping[key] for key in range(count)]


def _count_at_least(scores: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """For each row r: how many entries of ``scores[r]`` are >= ``reference[r]``.

    Ties count against the ground truth, so a collapsed model (all scores equal) scores ~0
    recall instead of a flattering 100. A row holding NaN (a diverged model) ranks its ground truth
    last: NaN compares false with everything, which would otherwise make it a hit."""
    counts = torch.empty(scores.shape[0], dtype=torch.long, device=scores.device)
    for start in range(0, scores.shape[0], _CHUNK):
        rows = slice(start, start + _CHUNK)
        chunk = scores[rows]
        counted = torch.ge(chunk, reference[rows, None]).sum(dim=1, dtype=torch.int32).long()
        undefined = torch.isnan(chunk).any(dim=1) | torch.isnan(reference[rows])
        counts[rows] = torch.where(undefined, torch.full_like(counted, torch.iinfo(torch.int32).max), counted)
    return counts


def itm_eval(scores_i2t, scores_t2i, txt2img: Union[Sequence[int], Mapping[int, int]],
             img2txt: Union[Sequence[Sequence[int]], Mapping[int, Sequence[int]]]) -> dict:
    """Recall@{1,5,10} in percent for text retrieval (per image, the best-ranked of its captions)
    and image retrieval (per caption, its image). Accepts numpy arrays or tensors:
    ``scores_i2t`` is n_img x n_txt and ``scores_t2i`` is n_txt x n_img; ``txt2img`` and ``img2txt``
    as lists or as the authors' dicts ``{caption: image}`` / ``{image: [captions]}``. Each recall is
    count / n * 100 in float64."""
    i2t = _as_tensor(scores_i2t)
    t2i = _as_tensor(scores_t2i)
    img2txt = _as_list(img2txt, i2t.shape[0], "img2txt")
    txt2img = _as_list(txt2img, t2i.shape[0], "txt2img")
    device = i2t.device
    pair_img = torch.tensor([i for i, caps in enumerate(img2txt) for _ in caps], device=device)
    pair_txt = torch.tensor([t for caps in img2txt for t in caps], device=device)
    best_gt = torch.full((i2t.shape[0],), -torch.inf, device=device, dtype=i2t.dtype)
    gt_scores = i2t[pair_img, pair_txt]
    best_gt = best_gt.scatter_reduce(0, pair_img, gt_scores, reduce="amax")
    # rank of the best ground truth = captions scoring at least as high, minus the ground truths among them
    gt_at_best = torch.zeros_like(best_gt).scatter_add(0, pair_img, (gt_scores >= best_gt[pair_img]).to(best_gt.dtype))
    txt_ranks = _count_at_least(i2t, best_gt) - gt_at_best.long()

    gt_img = torch.as_tensor(np.asarray(txt2img), device=t2i.device).long()
    img_ranks = _count_at_least(t2i, t2i[torch.arange(t2i.shape[0], device=t2i.device), gt_img]) - 1

    result = {}
    for prefix, ranks in (("txt", txt_ranks), ("img", img_ranks)):
        for k in (1, 5, 10):
            result[f"{prefix}_r{k}"] = int((ranks < k).sum()) / len(ranks) * 100
        result[f"{prefix}_r_mean"] = sum(result[f"{prefix}_r{k}"] for k in (1, 5, 10)) / 3
    result["r_mean"] = (result["txt_r_mean"] + result["img_r_mean"]) / 2
    return {key: result[key] for key in
            ("txt_r1", "txt_r5", "txt_r10", "txt_r_mean", "img_r1", "img_r5", "img_r10",
             "img_r_mean", "r_mean")}
