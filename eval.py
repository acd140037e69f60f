"""Evaluate distilled sets (one checkpoint per phase, in order) against baselines of the same size.

    python eval.py --dataset flickr --image_trainable --ckpt_path logged_files/flickr/RUN/distilled_0_2000.pt \
        logged_files/flickr/RUN/distilled_1_2000.pt --baseline random
"""
from distill_utils.app.cli import run_script
from distill_utils.app.evaluate import main

if __name__ == "__main__":
    run_script(main)
