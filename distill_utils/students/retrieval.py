"""Retrieval evaluation of a dual encoder on a val/test split, prepared once and reused."""
from __future__ import annotations

from typing import Optional

import torch
from torch.utils.data import DataLoader

from networks import DualEncoder

from ..data import RetrievalEvalDataset
from .metrics import itm_eval

_PRELOAD_LIMIT = 2 << 30  # keep decoded split images in memory below 2 GiB


class RetrievalBenchmark:
    """A split's images and cached caption features, with ``evaluate(model) -> recall dict``.

    Images are decoded once (kept in memory when small enough). With a frozen image encoder the
    encoder's features are computed once too: every student shares those frozen weights."""

    def __init__(self, dataset: RetrievalEvalDataset, text_features: torch.Tensor, device: torch.device,
                 batch_size: int = 128, num_workers: int = 0):
        if text_features.shape[0] != len(dataset.text):
            raise ValueError(f"{len(dataset.text)} captions in {dataset.ann_file} but {text_features.shape[0]} "
                             f"cached text features: delete the stale cache file in --npz_dir")
        self.dataset = dataset
        self.device = device
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.text_features = text_features.to(device)
        self.txt2img = dataset.txt2img
        self.img2txt = dataset.img2txt
        self._images: Optional[torch.Tensor] = None
        self._frozen: Optional[tuple] = None

    def _batches(self):
        if self._images is not None:
            for start in range(0, len(self._images), self.batch_size):
                yield self._images[start:start + self.batch_size].to(self.device, non_blocking=True)
            return
        # its own generator: a DataLoader draws a seed when it starts iterating, and from the global
        # generator that would shift the dropout masks of the student being evaluated (only at the first
        # evaluation, before the images are kept), making a student's result depend on evaluation order
        loader = DataLoader(self.dataset, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers,
                            pin_memory=self.device.type == "cuda", generator=torch.Generator())
        collected, size = [], 0
        for images, _ in loader:
            size += images.numel() * images.element_size()
            collected.append(images)
            yield images.to(self.device, non_blocking=True)
        if size <= _PRELOAD_LIMIT:
            self._images = torch.cat(collected)
            if self.device.type == "cuda":
                self._images = self._images.pin_memory()

    @torch.no_grad()
    def image_features(self, model: DualEncoder) -> torch.Tensor:
        """Unnormalised image embeddings of the whole split."""
        if model.image_trainable:
            return torch.cat([_image_head(model, model.image_encoder(x)) for x in self._batches()])
        fingerprint = next(model.image_encoder.parameters()).detach().flatten()[:16].cpu().clone()
        if self._frozen is None or not torch.equal(self._frozen[0], fingerprint):
            features = torch.cat([model.image_encoder(x) for x in self._batches()])
            self._frozen = (fingerprint, features)
        return model.image_projection(self._frozen[1])

    @torch.no_grad()
    def evaluate(self, model: DualEncoder) -> dict:
        was_training = model.training
        model.eval()
        try:
            image = torch.nn.functional.normalize(self.image_features(model), dim=-1)
            text = torch.cat([model.encode_text(self.text_features[s:s + 4096])
                              for s in range(0, len(self.text_features), 4096)])
            scores = image @ text.t()
            return itm_eval(scores, scores.t(), self.txt2img, self.img2txt)
        finally:
            model.train(was_training)


def _image_head(model: DualEncoder, features: torch.Tensor) -> torch.Tensor:
    return features if model.image_projection is None else model.image_projection(features)


def split_benchmarks(data, device: torch.device, batch_size: int, num_workers: int):
    """``(test, val)`` benchmarks of a :class:`~distill_utils.data.context.DataContext`; val is None when its
    caption features were not loaded."""
    def build(split, features):
        return RetrievalBenchmark(split, features, device, batch_size, num_workers)
    return build(data.test, data.test_text), (build(data.val, data.val_text) if data.val_text is not None else None)
