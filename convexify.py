"""Turn expert trajectories into shortcut (convexified) trajectories.

    python convexify.py --start 0 --end 6 --normal_dir ./buffer/flickr/nfnet_bert/InfoNCE/normal
"""
from distill_utils.app.cli import run_script
from distill_utils.app.convexify import main

if __name__ == "__main__":
    run_script(main)
