"""Cached frozen-text features: ``{npz_dir}/{dataset}_{text_encoder}[_split]_text_embed.npz``.

The array key is ``bert_test_embed`` whatever the split, as in the reference, so its cache files
are interchangeable with ours. We add a ``caption_digest`` so a cache built from other captions is
rebuilt even when its row count happens to match.
"""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from ..runtime.atomic import atomic_write_bytes_with
from ..runtime.errors import describe_os_error

log = logging.getLogger(__name__)

ARRAY_KEY = "bert_test_embed"
DIGEST_KEY = "caption_digest"


def cache_path(npz_dir: str, dataset: str, text_encoder: str, split: str) -> Path:
    """test -> ``{dataset}_{enc}_text_embed.npz`` (the reference's name); train/val add the split."""
    suffix = "" if split == "test" else f"_{split}"
    return Path(npz_dir) / f"{dataset}_{text_encoder}{suffix}_text_embed.npz"


def caption_digest(captions: Sequence[str]) -> str:
    return hashlib.sha1("\n".join(captions).encode("utf-8")).hexdigest()


def _read_valid(path: Path, captions: Sequence[str]) -> Optional[np.ndarray]:
    if not path.is_file():
        return None
    try:
        with np.load(path) as archive:
            embeddings = archive[ARRAY_KEY]
            digest = str(archive[DIGEST_KEY]) if DIGEST_KEY in archive.files else None
    except Exception as error:  # empty, truncated (BadZipFile, EOFError), foreign: a cache is rebuilt, never trusted
        log.warning("text-embedding cache %s is unreadable (%s); rebuilding it", path, error)
        return None
    if embeddings.ndim != 2 or embeddings.shape[0] != len(captions):
        log.warning("text-embedding cache %s has %s rows for %d captions (stale); rebuilding it",
                    path, embeddings.shape[0] if embeddings.ndim else "no", len(captions))
        return None
    if digest is not None and digest != caption_digest(captions):
        log.warning("text-embedding cache %s was built from other captions (stale); rebuilding it", path)
        return None
    if not np.isfinite(embeddings).all():
        log.warning("text-embedding cache %s holds NaN/Inf; rebuilding it", path)
        return None
    return embeddings


def write_atomically(path: Path, embeddings: np.ndarray, captions: Sequence[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes_with(path, lambda stream: np.savez(
        stream, **{ARRAY_KEY: embeddings, DIGEST_KEY: np.array(caption_digest(captions))}))


def load_or_build(path: Path, captions: Sequence[str], make_encoder: Callable[[], "torch.nn.Module"],
                  batch_size: int = 256, device: Optional[torch.device] = None) -> torch.Tensor:
    """Embeddings (len(captions) x d, float32, CPU) from the cache, or computed, cached and returned.
    ``make_encoder`` is called only when the cache is missing or stale."""
    embeddings = _read_valid(Path(path), captions)
    if embeddings is None:
        encoder = make_encoder()
        if device is not None:
            encoder.to(device)
        log.info("encoding %d captions into %s", len(captions), path)
        embeddings = encoder.encode(list(captions), batch_size=batch_size,
                                    progress=f"text features -> {Path(path).name}").numpy().astype(np.float32)
        try:
            write_atomically(Path(path), embeddings, captions)
        except OSError as error:  # the features are in memory: a cache that cannot be written costs only time
            log.warning("text features not cached: %s The run goes on; pass --npz_dir a writable folder to keep "
                        "them for the next run.", describe_os_error(error))
    return torch.from_numpy(np.ascontiguousarray(embeddings, dtype=np.float32))

