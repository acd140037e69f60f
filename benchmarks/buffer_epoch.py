"""Expert-training throughput (images/s): cached caption features vs running the text encoder on
every batch (the reference's way), on the shapes dataset.

    python -m benchmarks.buffer_epoch [--device cpu --text_encoder minilm --image_encoder convnet_tiny]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from distill_utils import MultilabelContrastiveLoss
from distill_utils.data import build_datasets, shapes
from networks import DualEncoderConfig, create_text_encoder

from .common import device_name, table, write_json


def epoch_images_per_second(model, loader, encode, device, cache_features=None, max_batches=None) -> float:
    criterion = MultilabelContrastiveLoss("InfoNCE")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    seen, started = 0, time.perf_counter()
    for step, (images, index) in enumerate(loader):
        if max_batches and step >= max_batches:
            break
        images = images.to(device)
        texts = cache_features[index].to(device) if cache_features is not None else encode(index)
        loss = criterion(model(images, texts), torch.eye(len(images), device=device))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        seen += len(images)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return seen / (time.perf_counter() - started)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--text_encoder", default="minilm")
    parser.add_argument("--image_encoder", default="convnet_tiny")
    parser.add_argument("--image_size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=10)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as folder:
        root = shapes.generate(Path(folder), shapes.ShapesConfig(num_train=300, num_val=10, num_test=10,
                                                                 image_size=args.image_size), progress=False)
        train, _, _ = build_datasets("shapes", str(root), str(root), args.image_size)
        encoder = create_text_encoder(args.text_encoder).to(device)
        features = encoder.encode(train.captions)
        model = DualEncoderConfig(args.image_encoder, features.shape[1], image_trainable=True).build(seed=0).to(device)
        loader = DataLoader(train, batch_size=128, shuffle=True, num_workers=0)
        encode = lambda index: encoder([train.captions[i] for i in index.tolist()]).to(device)  # noqa: E731
        per_batch = epoch_images_per_second(model, loader, encode, device, max_batches=args.batches)
        cached = epoch_images_per_second(model, loader, encode, device, features, max_batches=args.batches)
        train.folder.cache = {}
        epoch_images_per_second(model, loader, encode, device, features, max_batches=args.batches)  # fill the cache
        decoded = epoch_images_per_second(model, loader, encode, device, features, max_batches=args.batches)
    payload = {"device": device_name(device), "text_encoder": args.text_encoder, "image_encoder": args.image_encoder,
               "images_per_s": {"text encoder every batch": per_batch, "cached caption features": cached,
                                "cached features + decoded images": decoded}}
    print(f"expert training throughput on {payload['device']} ({args.image_encoder} {args.image_size}px, {args.text_encoder})")
    print(table([["captions", "images/s"], *[[k, f"{v:.0f}"] for k, v in payload["images_per_s"].items()]]))
    print(f"written to {write_json(f'buffer_epoch_{device.type}', payload)}")
    return payload


if __name__ == "__main__":
    main()
