#!/usr/bin/env bash
# Download annotations and images into the folders the scripts expect. Idempotent: finished steps
# leave a marker and are skipped on rerun. Needs network, `hf` (pip install huggingface_hub), wget, unzip.
# Usage: bash sh/prepare_data.sh [flickr] [coco] [cc3m]   (default: flickr)
set -euo pipefail
ANN_ROOT=./data/Annotation
FLICKR_ROOT=./distill_utils/data/Flickr30k
COCO_ROOT=./distill_utils/data/COCO
CC3M_ROOT=./distill_utils/data/CC3M
DATASETS=("${@:-flickr}")

done_marker() { [ -f "$1/.prepared" ]; }
mark_done() { touch "$1/.prepared"; }

if [ ! -f "$ANN_ROOT/flickr30k_train.json" ]; then
  mkdir -p ./data
  hf download previsior/PTM-ST --repo-type dataset --include "Annotation/*" --local-dir ./data
fi

for dataset in "${DATASETS[@]}"; do
  case "$dataset" in
    flickr)
      mkdir -p "$FLICKR_ROOT"
      if ! done_marker "$FLICKR_ROOT"; then
        hf download nlphuji/flickr30k --repo-type dataset --include "flickr30k-images.zip" --local-dir "$FLICKR_ROOT"
        unzip -q -o "$FLICKR_ROOT/flickr30k-images.zip" -d "$FLICKR_ROOT"
        rm -f "$FLICKR_ROOT/flickr30k-images.zip"
        mark_done "$FLICKR_ROOT"
      fi ;;
    coco)
      mkdir -p "$COCO_ROOT"
      if ! done_marker "$COCO_ROOT"; then
        for split in train2014 val2014; do
          [ -d "$COCO_ROOT/$split" ] && continue
          wget -c -q --show-progress "http://images.cocodataset.org/zips/${split}.zip" -O "$COCO_ROOT/${split}.zip"
          unzip -q -o "$COCO_ROOT/${split}.zip" -d "$COCO_ROOT" && rm -f "$COCO_ROOT/${split}.zip"
        done
        mark_done "$COCO_ROOT"
      fi ;;
    cc3m)
      mkdir -p "$CC3M_ROOT"
      if ! done_marker "$CC3M_ROOT"; then
        echo "CC3M has no single archive: fetch the images listed in $ANN_ROOT/cc3m_captions_*.json with" >&2
        echo "img2dataset (pip install img2dataset) into $CC3M_ROOT so that each entry's 'image' path exists," >&2
        echo "then run: touch $CC3M_ROOT/.prepared" >&2
        exit 1
      fi ;;
    *) echo "unknown dataset $dataset (flickr, coco, cc3m)" >&2; exit 2 ;;
  esac
done
echo "data ready: annotations in $ANN_ROOT"
