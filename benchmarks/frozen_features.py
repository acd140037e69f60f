"""Seconds per matching iteration with a frozen image encoder: its features computed once per
iteration (the default) against the encoder run inside every student step (``frozen_features=False``,
what a trainable encoder needs). Both give the same gradients (tests/test_matching.py); this measures
what the shortcut saves, one process, the two in turn.

    python -m benchmarks.frozen_features --device cpu            # the stamps recipes' sizes
    python -m benchmarks.frozen_features --device cpu --image_size 64 --num_queries 20
"""
from __future__ import annotations

import argparse
import platform

import torch

from distill_utils import MultilabelContrastiveLoss
from distill_utils.distillation.matching import MiniBatchSampler, TrajectoryMatcher
from distill_utils.distillation.synthetic import SyntheticSet, make_similarity
from networks import SIDES, DualEncoderConfig

from .common import alternating_seconds, device_name, paired_ratio, summary, write_json


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--image_encoder", default="efficientnet_lite0", help="random weights in its architecture")
    parser.add_argument("--image_size", type=int, default=96)
    parser.add_argument("--num_queries", type=int, default=50)
    parser.add_argument("--mini_batch_size", type=int, default=8)
    parser.add_argument("--syn_steps", type=int, default=5)
    parser.add_argument("--text_dim", type=int, default=384)
    parser.add_argument("--out_embedding", type=int, default=256)
    parser.add_argument("--keep_graphs", type=int, default=None, help="first-pass graphs kept (default: all steps)")
    parser.add_argument("--repeats", type=int, default=5)
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    model = DualEncoderConfig(args.image_encoder, args.text_dim, image_trainable=False,
                              out_embedding=args.out_embedding).build(seed=0).to(device).train()
    generator = torch.Generator().manual_seed(0)
    n = args.num_queries
    synthetic = SyntheticSet(torch.randn(n, 3, args.image_size, args.image_size, generator=generator),
                             torch.randn(n, args.text_dim, generator=generator),
                             make_similarity("full", n, generator=generator), 0.1, 0.1).to(device)
    start = {s: torch.cat([p.detach().flatten() for p in model.side_parameters(s)]) for s in SIDES}
    target = {s: v + 0.01 * torch.randn(v.shape, generator=generator).to(device) for s, v in start.items()}
    sampler = MiniBatchSampler(n, args.mini_batch_size, generator)
    batches = [sampler.next().to(device) for _ in range(args.syn_steps)]
    criterion = MultilabelContrastiveLoss("InfoNCE")

    def iteration(once: bool):
        def run():
            synthetic.zero_grad(set_to_none=True)
            keep = args.syn_steps if args.keep_graphs is None else args.keep_graphs
            TrajectoryMatcher(model, criterion, args.syn_steps, keep_graphs=keep,
                              frozen_features=once).match(synthetic, start, target, batches)
        return run
    times = alternating_seconds({"once per iteration": iteration(True), "every step": iteration(False)}, device,
                                args.repeats)
    ratio = paired_ratio(times["once per iteration"], times["every step"])
    payload = {"args": vars(args), "device": device_name(device), "machine": platform.processor(),
               **{name: summary(t) for name, t in times.items()}, "ratio_once_over_every_step": ratio}
    keep = "all" if args.keep_graphs is None else args.keep_graphs
    path = write_json(f"frozen_features_{args.image_encoder}_{args.image_size}px_{n}_keep{keep}", payload)
    print(f"{device_name(device)}: once per iteration {summary(times['once per iteration'])['median_s']:.3f} s, "
          f"every step {summary(times['every step'])['median_s']:.3f} s (ratio {ratio:.2f}); {path}")
    return payload


if __name__ == "__main__":
    main()
