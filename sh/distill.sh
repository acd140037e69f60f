#!/usr/bin/env bash
# Every distillation recipe of the paper. Usage: bash sh/distill.sh GPU_ID [RECIPE]
# RECIPE is one of: flickr500 flickr200 flickr100 coco500 coco200 coco100 cc3m500 cc3m200 cc3m100 (default flickr500).
# Needs the shortcut trajectories of sh/convexify.sh. The authors' 100-pair recipes passed two phases
# with one-element lists and crashed after the first phase; here they are single-phase (--subset_num 1).
set -euo pipefail
export CUDA_VISIBLE_DEVICES="${1:?usage: bash sh/distill.sh GPU_ID [RECIPE]}"
RECIPE="${2:-flickr500}"
BUFFER_ROOT=./buffer
ANN_ROOT=./data/Annotation/
COMMON=(--lr_img 1000 --lr_txt 1000 --lr_lr 0.01 --lr_teacher_img 0.1 --lr_teacher_txt 0.1 --sim_type full
        --ema_decay 0.99 --image_encoder nfnet --text_encoder bert --image_trainable --ann_root "$ANN_ROOT")

case "$RECIPE" in
  flickr500)  # Flickr30k, 500 pairs
    python distill_ptm-st.py --dataset flickr "${COMMON[@]}" \
        --buffer_path "$BUFFER_ROOT/flickr/nfnet_bert/InfoNCE/convexified_0_6" "$BUFFER_ROOT/flickr/nfnet_bert/InfoNCE/convexified_0_8" \
        --min_start_epoch 0 1 --max_start_epoch 2 3 --num_queries 200 299 --Iteration 2000 2000 --subset_num 2 \
        --lr_sim 10.0 --mini_batch_size 40 --name "flickr500" ;;
  flickr200)  # Flickr30k, 200 pairs
    python distill_ptm-st.py --dataset flickr "${COMMON[@]}" \
        --buffer_path "$BUFFER_ROOT/flickr/nfnet_bert/InfoNCE/convexified_0_6" "$BUFFER_ROOT/flickr/nfnet_bert/InfoNCE/convexified_0_8" \
        --min_start_epoch 0 1 --max_start_epoch 2 3 --num_queries 99 100 --Iteration 2000 2000 --subset_num 2 \
        --lr_sim 10.0 --name "flickr200" ;;
  flickr100)  # Flickr30k, 100 pairs
    python distill_ptm-st.py --dataset flickr "${COMMON[@]}" \
        --buffer_path "$BUFFER_ROOT/flickr/nfnet_bert/InfoNCE/convexified_0_6" \
        --min_start_epoch 0 --max_start_epoch 2 --num_queries 99 --Iteration 2000 --subset_num 1 \
        --lr_sim 10.0 --name "flickr100" ;;
  coco500)  # COCO, 500 pairs
    python distill_ptm-st.py --dataset coco --image_root ./distill_utils/data/COCO/ "${COMMON[@]}" \
        --buffer_path "$BUFFER_ROOT/coco/nfnet_bert/InfoNCE/convexified_0_6" "$BUFFER_ROOT/coco/nfnet_bert/InfoNCE/convexified_0_8" \
        --min_start_epoch 0 1 --max_start_epoch 2 3 --num_queries 200 299 --Iteration 2000 2000 --subset_num 2 \
        --lr_sim 50 --name "coco500" ;;
  coco200)  # COCO, 200 pairs
    python distill_ptm-st.py --dataset coco --image_root ./distill_utils/data/COCO/ "${COMMON[@]}" \
        --buffer_path "$BUFFER_ROOT/coco/nfnet_bert/InfoNCE/convexified_0_6" "$BUFFER_ROOT/coco/nfnet_bert/InfoNCE/convexified_0_8" \
        --min_start_epoch 0 1 --max_start_epoch 2 3 --num_queries 99 100 --Iteration 2000 2000 --subset_num 2 \
        --lr_sim 50 --name "coco200" ;;
  coco100)  # COCO, 100 pairs
    python distill_ptm-st.py --dataset coco --image_root ./distill_utils/data/COCO/ "${COMMON[@]}" \
        --buffer_path "$BUFFER_ROOT/coco/nfnet_bert/InfoNCE/convexified_0_6" \
        --min_start_epoch 0 --max_start_epoch 2 --num_queries 99 --Iteration 2000 --subset_num 1 \
        --lr_sim 50 --name "coco100" ;;
  cc3m500)  # CC3M, 500 pairs
    python distill_ptm-st.py --dataset cc3m "${COMMON[@]}" \
        --buffer_path "$BUFFER_ROOT/cc3m/nfnet_bert/InfoNCE/convexified_0_6" "$BUFFER_ROOT/cc3m/nfnet_bert/InfoNCE/convexified_0_8" \
        --min_start_epoch 0 1 --max_start_epoch 2 3 --num_queries 200 299 --Iteration 2000 2000 --subset_num 2 \
        --lr_sim 50 --name "cc3m500" ;;
  cc3m200)  # CC3M, 200 pairs
    python distill_ptm-st.py --dataset cc3m "${COMMON[@]}" \
        --buffer_path "$BUFFER_ROOT/cc3m/nfnet_bert/InfoNCE/convexified_0_6" "$BUFFER_ROOT/cc3m/nfnet_bert/InfoNCE/convexified_0_8" \
        --min_start_epoch 0 1 --max_start_epoch 2 3 --num_queries 99 100 --Iteration 2000 2000 --subset_num 2 \
        --lr_sim 50 --name "cc3m200" ;;
  cc3m100)  # CC3M, 100 pairs
    python distill_ptm-st.py --dataset cc3m "${COMMON[@]}" \
        --buffer_path "$BUFFER_ROOT/cc3m/nfnet_bert/InfoNCE/convexified_0_6" \
        --min_start_epoch 0 --max_start_epoch 2 --num_queries 99 --Iteration 2000 --subset_num 1 \
        --lr_sim 50 --name "cc3m100" ;;
  *) echo "unknown recipe $RECIPE (see the header of sh/distill.sh)" >&2; exit 2 ;;
esac
