#!/usr/bin/env bash
# Shortcut trajectories for both phases of the paper's recipes. Usage: bash sh/convexify.sh [DATASET]
set -euo pipefail
DATASET="${1:-flickr}"
NORMAL_DIR="./buffer/${DATASET}/nfnet_bert/InfoNCE/normal"

python convexify.py --normal_dir "$NORMAL_DIR" --start 0 --end 6   # phase 0 -> convexified_0_6
python convexify.py --normal_dir "$NORMAL_DIR" --start 0 --end 8   # phase 1 -> convexified_0_8
# Compact encoding (endpoints + beta table, read transparently by the distiller):
# python convexify.py --normal_dir "$NORMAL_DIR" --start 0 --end 6 --compact --dtype float16
