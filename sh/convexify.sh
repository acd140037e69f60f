#!/usr/bin/env bash
# Shortcut trajectories for both phases of the paper's recipes: convexified_0_6 (phase 0) and
# convexified_0_8 (phase 1) beside $BUFFER_ROOT/DATASET/nfnet_bert/InfoNCE/normal/. Files already
# converted are skipped, so a rerun after an interruption continues.
# Usage: bash sh/convexify.sh [DATASET [convexify.py flags...]]   (flickr, coco, cc3m or stamps; default: flickr)
#   e.g. bash sh/convexify.sh flickr --compact --dtype float16   (endpoints + pace table only)
set -euo pipefail
source "$(dirname "$0")/_common.sh"
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then show_help "sh/convexify.sh"; exit 0; fi
DATASET="${1:-flickr}"
shift $(( $# < 1 ? 0 : 1 ))
image_root_of "$DATASET" >/dev/null
NORMAL_DIR="$(normal_dir_of "$DATASET")"
read -r -a ENDS <<< "$(ends_of "$DATASET")"

for end in "${ENDS[@]}"; do  # 6 and 8 unless SHORTCUT_ENDS says otherwise
  ${PYTHON:-python} convexify.py --normal_dir "$NORMAL_DIR" --start 0 --end "$end" "$@"
done
