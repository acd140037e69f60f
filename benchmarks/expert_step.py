"""Expert-training speed switches, each measured on and off: TF32, channels-last, fused SGD, bf16.

    python -m benchmarks.expert_step --device cpu --config tiny
    python -m benchmarks.expert_step --device cuda --config nfnet224

Every variant runs the training loop of buffer.py (``train_one_epoch``) on the same in-memory
batches from the same initial model, so the figures isolate the switch (no data loading). Next to
images/s the table gives how far the variant's parameters end from the all-off run's (max relative
difference): TF32 and bfloat16 change results, channels-last and fused SGD should only reorder
float32 arithmetic. TF32 only exists on CUDA; on the CPU its row is skipped.
"""
from __future__ import annotations

import argparse
import time
from dataclasses import asdict, dataclass, fields
from typing import Dict, List

import torch

from distill_utils import MultilabelContrastiveLoss
from distill_utils.experts.training import ExpertOptim, make_optimizer, train_one_epoch
from distill_utils.runtime.speed import SpeedOptions
from networks import DualEncoderConfig

from .common import device_name, summary, synchronize, table, write_json


@dataclass(frozen=True)
class Config:
    image_encoder: str
    image_size: int
    text_dim: int
    batch_size: int
    batches: int
    repeats: int


CONFIGS = {
    "tiny": Config("convnet_tiny", 32, 384, 128, 4, 9),
    "convnet": Config("convnet", 32, 768, 128, 4, 9),
    "nfnet224": Config("nfnet", 224, 768, 128, 4, 9),  # the paper's image encoder, random weights
}
SWITCHES = [f.name for f in fields(SpeedOptions)]


def variants(device: torch.device) -> Dict[str, SpeedOptions]:
    off = SpeedOptions()
    chosen = {"all off": off}
    for name in SWITCHES:
        if name == "tf32" and device.type != "cuda":
            continue
        chosen[f"{name} only"] = SpeedOptions(**{name: True})
    chosen["all on"] = SpeedOptions(**{name: name != "tf32" or device.type == "cuda" for name in SWITCHES})
    chosen["defaults on this device"] = SpeedOptions.for_device(device)
    return chosen


def make_batches(config: Config, device: torch.device) -> List[tuple]:
    generator = torch.Generator().manual_seed(0)
    return [(torch.randn(config.batch_size, 3, config.image_size, config.image_size, generator=generator).to(device),
             torch.arange(b * config.batch_size, (b + 1) * config.batch_size)) for b in range(config.batches)]


class Variant:
    """One switch setting: its own model and optimizer from the same initial weights."""

    def __init__(self, speed: SpeedOptions, config: Config, batches, texts, device: torch.device):
        self.batches, self.texts, self.device = batches, texts, device
        model_config = DualEncoderConfig(config.image_encoder, config.text_dim, image_trainable=True)
        self.model = model_config.build(seed=0).to(device)
        self.speed = speed.for_model(self.model)
        self.speed.prepare_model(self.model)
        hyper = ExpertOptim(0.01, 0.01, momentum=0.9, weight_decay=5e-4)
        self.optimizer, _ = make_optimizer(self.model, hyper, self.speed)
        self.criterion = MultilabelContrastiveLoss("InfoNCE")

    def one_pass(self) -> float:
        self.speed.apply_globals()
        synchronize(self.device)
        started = time.perf_counter()
        train_one_epoch(self.model, self.batches, self.texts, self.optimizer, self.criterion, self.device,
                        self.speed, progress=False)
        synchronize(self.device)
        return time.perf_counter() - started

    def parameters(self) -> torch.Tensor:
        return torch.cat([p.detach().float().reshape(-1).cpu() for p in self.model.parameters() if p.requires_grad])


def measure(chosen: Dict[str, SpeedOptions], config: Config, batches, texts, device: torch.device) -> Dict[str, dict]:
    """The first pass of every variant (same dropout masks) gives the parameter difference; then the
    variants take turns, ``repeats`` rounds, so slow drifts of the machine hit them all alike."""
    runs = {name: Variant(speed, config, batches, texts, device) for name, speed in chosen.items()}
    finals = {}
    for name, run in runs.items():
        torch.manual_seed(0)
        run.one_pass()
        finals[name] = run.parameters()
    times = {name: [] for name in runs}
    for _ in range(config.repeats):
        for name, run in runs.items():
            times[name].append(run.one_pass())
    SpeedOptions().apply_globals()
    reference, images = finals["all off"], config.batch_size * config.batches
    base = images / summary(times["all off"])["median_s"]
    results = {}
    for name, run in runs.items():
        rate = images / summary(times[name])["median_s"]
        difference = (finals[name] - reference).abs().max() / reference.abs().max()
        results[name] = {**summary(times[name]), "images_per_s": rate, "speedup": rate / base,
                         "max_relative_parameter_difference": float(difference), "options": asdict(run.speed)}
    return results


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--config", default="tiny", choices=sorted(CONFIGS))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    config = CONFIGS[args.config]
    batches = make_batches(config, device)
    texts = torch.randn(config.batch_size * config.batches, config.text_dim, generator=torch.Generator().manual_seed(1))
    results = measure(variants(device), config, batches, texts, device)
    print(f"expert training steps, config {args.config} ({config.image_encoder} {config.image_size}px, "
          f"batch {config.batch_size}) on {device_name(device)}")
    rows = [[name, f"{r['images_per_s']:.0f}", f"{r['speedup']:.2f}x", f"{r['max_relative_parameter_difference']:.1e}"]
            for name, r in results.items()]
    print(table([["variant", "images/s", "speed-up", "parameter difference"], *rows]))
    payload = {"config": asdict(config), "device": device_name(device), "results": results}
    print(f"written to {write_json(f'expert_step_{args.config}_{device.type}', payload)}")
    return payload


if __name__ == "__main__":
    main()
