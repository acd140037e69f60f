"""Everything a script needs from a dataset: splits, cached text features, the model config."""
from __future__ import annotations

import argparse
import hashlib

import torch

from networks import DualEncoderConfig, create_text_encoder

from ..data import FolderSplit, build_datasets, resolve_roots, text_cache
from ..data.context import DataContext


def load_data(args: argparse.Namespace, device: torch.device, augment: bool = True, need_val: bool = False,
              cache_decoded: bool = False) -> DataContext:
    """Build the splits and load (or compute once) the frozen text features of their captions."""
    train, val, test = build_datasets(args.dataset, args.image_root, args.ann_root, args.image_size,
                                      augment=augment, cache_decoded=cache_decoded, split=folder_split(args))

    def features(split: str, captions):
        path = text_cache.cache_path(args.npz_dir, cache_name(args), args.text_encoder, split)
        return text_cache.load_or_build(path, captions, lambda: create_text_encoder(args.text_encoder, args.checkpoint_dir),
                                        device=device)

    test_text = features("test", test.text)
    train_text = features("train", train.captions)
    val_text = features("val", val.text) if need_val else None
    return DataContext(train, val, test, train_text, test_text, val_text)


def folder_split(args: argparse.Namespace) -> FolderSplit:
    """The split flags of a folder dataset (runs recorded before they existed drew with the defaults)."""
    default = FolderSplit()
    return FolderSplit(getattr(args, "val_fraction", default.val_fraction),
                       getattr(args, "test_fraction", default.test_fraction),
                       getattr(args, "split_seed", default.seed), getattr(args, "captions", default.captions))


def cache_name(args: argparse.Namespace) -> str:
    """The text cache's dataset name: ``folder`` adds a digest of its split folder, so two folders'
    caches do not take turns overwriting one file."""
    if args.dataset != "folder":
        return args.dataset
    _, annotations = resolve_roots(args.dataset, args.image_root, args.ann_root)
    return "folder_" + hashlib.sha1(str(annotations.resolve()).encode("utf-8")).hexdigest()[:8]


def model_config(args: argparse.Namespace, text_dim: int) -> DualEncoderConfig:
    return DualEncoderConfig(image_encoder=args.image_encoder, text_dim=text_dim,
                             image_trainable=args.image_trainable, out_embedding=args.out_embedding,
                             temperature=args.temperature, image_pretrained=args.image_pretrained,
                             checkpoint_dir=args.checkpoint_dir,
                             fold_frozen_norms=getattr(args, "frozen_norms", "fold") == "fold")
