"""Seconds per matching iteration with a frozen EfficientNet-Lite0 whose batch norms are folded into its
convolutions (``--frozen_norms fold``, the default) against the encoder as loaded (``keep``), at the stamps
recipes' sizes, one process, the two in turn; and how far each one's image gradients lie from the
float64 computation (folding must be no further than float32 already is).

    python -m benchmarks.frozen_norms                      # 20, 50 and 100 synthetic pairs
    python -m benchmarks.frozen_norms --budgets 50 --repeats 10
"""
from __future__ import annotations

import argparse
import platform

import torch

from distill_utils import MultilabelContrastiveLoss
from distill_utils.distillation.matching import MiniBatchSampler, TrajectoryMatcher
from distill_utils.distillation.synthetic import SyntheticSet, make_similarity
from networks import SIDES, DualEncoderConfig

from .common import alternating_seconds, device_name, paired_ratio, summary, table, write_json

VARIANTS = {"fold": True, "keep": False}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.frozen_norms", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--budgets", type=int, nargs="+", default=[20, 50, 100], help="synthetic pairs")
    parser.add_argument("--image_size", type=int, default=96)
    parser.add_argument("--mini_batch_size", type=int, default=8)
    parser.add_argument("--syn_steps", type=int, default=5)
    parser.add_argument("--text_dim", type=int, default=384)
    parser.add_argument("--out_embedding", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    return parser.parse_args(argv)


def build(args, fold: bool, dtype=torch.float32):
    config = DualEncoderConfig("efficientnet_lite0", args.text_dim, image_trainable=False, image_pretrained=True,
                               out_embedding=args.out_embedding, fold_frozen_norms=fold)
    return config.build(seed=0).to(args.device, dtype).train()


def fresh_set(args, n: int, dtype) -> SyntheticSet:
    """The same synthetic set on every call (its generator seeded by ``n``)."""
    generator = torch.Generator().manual_seed(n)
    synthetic = SyntheticSet(torch.randn(n, 3, args.image_size, args.image_size, generator=generator),
                             torch.randn(n, args.text_dim, generator=generator),
                             make_similarity("full", n, generator=generator), 0.1, 0.1)
    return synthetic.to(args.device, dtype)


def trajectory_problem(args, n: int, model):
    generator = torch.Generator().manual_seed(n + 1)
    start = {s: torch.cat([p.detach().flatten() for p in model.side_parameters(s)]) for s in SIDES}
    target = {s: v + 0.01 * torch.randn(v.shape, generator=generator) for s, v in start.items()}
    sampler = MiniBatchSampler(n, args.mini_batch_size, generator)
    return start, target, [sampler.next() for _ in range(args.syn_steps)]


def image_gradient(args, model, n: int, start, target, batches, dtype=torch.float32) -> torch.Tensor:
    device = torch.device(args.device)
    torch.manual_seed(0)  # the heads' dropout masks: the same in every computation compared
    synthetic = fresh_set(args, n, dtype)
    TrajectoryMatcher(model, MultilabelContrastiveLoss("InfoNCE"), args.syn_steps, keep_graphs=args.syn_steps).match(
        synthetic, {s: v.to(device, dtype) for s, v in start.items()},
        {s: v.to(device, dtype) for s, v in target.items()}, [b.to(device) for b in batches])
    return synthetic.images.grad.detach().double().cpu()


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def measure(args, n: int, models) -> dict:
    start, target, batches = trajectory_problem(args, n, models["keep"])
    exact = image_gradient(args, build(args, False, torch.float64), n, start, target, batches, torch.float64)
    error = {name: relative(image_gradient(args, model, n, start, target, batches), exact)
             for name, model in models.items()}

    def iteration(model):
        def run():
            image_gradient(args, model, n, start, target, batches)
        return run
    times = alternating_seconds({name: iteration(model) for name, model in models.items()},
                                torch.device(args.device), args.repeats)
    return {"pairs": n, **{name: summary(t) for name, t in times.items()},
            "ratio_fold_over_keep": paired_ratio(times["fold"], times["keep"]),
            "gradient_error_vs_float64": error}


def main(argv=None) -> dict:
    args = parse_args(argv)
    models = {name: build(args, fold) for name, fold in VARIANTS.items()}
    rows = [measure(args, n, models) for n in args.budgets]
    payload = {"args": vars(args), "device": device_name(torch.device(args.device)), "machine": platform.processor(),
               "threads": torch.get_num_threads(), "rows": rows}
    path = write_json("frozen_norms", payload)
    print(table([["pairs", "fold s/it", "keep s/it", "fold / keep", "fold vs float64", "keep vs float64"]] + [
        [str(r["pairs"]), f"{r['fold']['median_s']:.3f}", f"{r['keep']['median_s']:.3f}",
         f"{r['ratio_fold_over_keep']:.2f}", f"{r['gradient_error_vs_float64']['fold']:.1e}",
         f"{r['gradient_error_vs_float64']['keep']:.1e}"] for r in rows]))
    print(path)
    return payload


if __name__ == "__main__":
    main()
