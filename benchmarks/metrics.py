"""itm_eval on a COCO-sized score matrix (5k images x 25k captions) vs a per-row Python loop.

    python -m benchmarks.metrics [--images 5000 --captions_per_image 5 --loop_rows 200]

The loop (the reference's way: argsort each row, find the ground truth) is timed on ``--loop_rows``
rows of each direction and extrapolated to all rows.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from distill_utils import itm_eval

from .common import table, write_json


def loop_ranks(scores_i2t: np.ndarray, scores_t2i: np.ndarray, img2txt, txt2img, rows: int) -> float:
    """Seconds for the per-row loop over ``rows`` rows of each direction."""
    started = time.perf_counter()
    for i in range(rows):
        order = np.argsort(scores_i2t[i])[::-1]
        min(np.where(order == t)[0][0] for t in img2txt[i])
    for t in range(rows):
        order = np.argsort(scores_t2i[t])[::-1]
        np.where(order == txt2img[t])[0][0]
    return time.perf_counter() - started


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--captions_per_image", type=int, default=5)
    parser.add_argument("--loop_rows", type=int, default=200)
    args = parser.parse_args(argv)
    n_img, n_txt = args.images, args.images * args.captions_per_image
    generator = torch.Generator().manual_seed(0)
    image = torch.nn.functional.normalize(torch.randn(n_img, 256, generator=generator), dim=1)
    txt2img = [t // args.captions_per_image for t in range(n_txt)]
    text = torch.nn.functional.normalize(image[txt2img] + torch.randn(n_txt, 256, generator=generator), dim=1)
    img2txt = [list(range(i * args.captions_per_image, (i + 1) * args.captions_per_image)) for i in range(n_img)]
    scores = image @ text.t()

    started = time.perf_counter()
    itm_eval(scores, scores.t(), txt2img, img2txt)
    ours = time.perf_counter() - started

    i2t, t2i = scores.numpy(), scores.t().contiguous().numpy()
    sample = loop_ranks(i2t, t2i, img2txt, txt2img, args.loop_rows)
    per_image_row, per_text_row = sample / (2 * args.loop_rows), sample / (2 * args.loop_rows)
    loop_estimate = per_image_row * n_img + per_text_row * n_txt
    payload = {"images": n_img, "captions": n_txt, "itm_eval_s": ours, "per_row_loop_s_estimated": loop_estimate,
               "loop_rows_timed": args.loop_rows, "speedup": loop_estimate / ours, "threads": torch.get_num_threads()}
    print(f"retrieval metrics on a {n_img} x {n_txt} score matrix")
    print(table([["implementation", "seconds"], ["itm_eval (vectorised)", f"{ours:.2f}"],
                 ["per-row loop (extrapolated)", f"{loop_estimate:.1f}"]]))
    print(f"speed-up {payload['speedup']:.0f}x; written to {write_json('metrics', payload)}")
    return payload


if __name__ == "__main__":
    main()
