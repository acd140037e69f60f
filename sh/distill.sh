#!/usr/bin/env bash
# Every distillation recipe of the paper, one per table row.
# Usage: bash sh/distill.sh GPU [RECIPE [distill_ptm-st.py flags...]]   (RECIPE default: flickr500)
#   GPU      CUDA_VISIBLE_DEVICES, e.g. 0 or 0,1
#   RECIPE   flickr500 flickr200 flickr100 coco500 coco200 coco100 cc3m500 cc3m200 cc3m100,
#            stamps20 stamps50 stamps100 (the Tux Paint photographs, sh/prepare_data.sh stamps; CPU-sized)
#   flags    passed after the recipe's own, so they override them (e.g. --keep_graphs 0, --resume)
# Several GPUs: NPROC=2 bash sh/distill.sh 0,1 flickr500 --segments_per_iter 2   (torchrun; each process
#   matches its share of the segments, a multiple of NPROC)
# Needs the shortcut trajectories of sh/convexify.sh; the run goes to $LOGGED_DIR/DATASET/RECIPE/.
# The authors' 100-pair recipes passed two phases with one-element lists and crashed after the first
# phase; here they are single-phase (--subset_num 1).
set -euo pipefail
source "$(dirname "$0")/_common.sh"
positional sh/distill.sh flickr500 "$@"
export CUDA_VISIBLE_DEVICES="$GPU"
RECIPE="$NAME"
DATASET="$(dataset_of_recipe "$RECIPE")"
SHORTCUTS="$(dirname "$(normal_dir_of "$DATASET")")"
read -r -a ENDS <<< "$(ends_of "$DATASET")"
FIRST="$SHORTCUTS/convexified_0_${ENDS[0]}"                # convexified_0_6
SECOND="$SHORTCUTS/convexified_0_${ENDS[1]:-${ENDS[0]}}"  # convexified_0_8
TWO_PHASES=(--buffer_path "$FIRST" "$SECOND" --subset_num 2
            --min_start_epoch 0 1 --max_start_epoch 2 3 --Iteration 2000 2000)
ONE_PHASE=(--buffer_path "$FIRST" --subset_num 1
           --min_start_epoch 0 --max_start_epoch 2 --Iteration 2000)
case "$RECIPE" in
  flickr500) RECIPE_ARGS=("${TWO_PHASES[@]}" --num_queries 200 299 --lr_sim 10.0 --mini_batch_size 40) ;;
  flickr200) RECIPE_ARGS=("${TWO_PHASES[@]}" --num_queries 99 100 --lr_sim 10.0) ;;
  flickr100) RECIPE_ARGS=("${ONE_PHASE[@]}" --num_queries 99 --lr_sim 10.0) ;;
  coco500)   RECIPE_ARGS=("${TWO_PHASES[@]}" --num_queries 200 299 --lr_sim 50) ;;
  coco200)   RECIPE_ARGS=("${TWO_PHASES[@]}" --num_queries 99 100 --lr_sim 50) ;;
  coco100)   RECIPE_ARGS=("${ONE_PHASE[@]}" --num_queries 99 --lr_sim 50) ;;
  cc3m500)   RECIPE_ARGS=("${TWO_PHASES[@]}" --num_queries 200 299 --lr_sim 50) ;;
  cc3m200)   RECIPE_ARGS=("${TWO_PHASES[@]}" --num_queries 99 100 --lr_sim 50) ;;
  cc3m100)   RECIPE_ARGS=("${ONE_PHASE[@]}" --num_queries 99 --lr_sim 50) ;;
  stamps*)   # 100 pairs or fewer: one phase on the first shortcut, as the authors' 100-pair recipes
             STAMPS_PHASES=(--buffer_path "$FIRST" --subset_num 1 --min_start_epoch 0 --max_start_epoch 2
                            --Iteration 1000 --eval_it 1000) ;;
esac
if is_stamps "$RECIPE"; then  # real photographs through a frozen ImageNet encoder, sized for a 2-core CPU
  SIZE="${RECIPE#stamps}"
  exec $(launcher) distill_ptm-st.py --dataset stamps --image_root "$(image_root_of stamps)" \
      --ann_root "$(ann_root_of stamps)" "${STAMPS_MODEL[@]}" "${STAMPS_PHASES[@]}" \
      --num_queries "$SIZE" --syn_steps 5 --mini_batch_size 8 --keep_graphs 5 \
      --lr_img 100 --lr_txt 0.5 --lr_sim 0.05 --lr_lr 1e-4 --clamp_lr 0.002 --lr_teacher_img 0.02 --lr_teacher_txt 0.02 --ema_decay 0.99 \
      --sim_type full --loss_type InfoNCE --epoch_eval_train 50 --num_eval 3 --eval_init false \
      --logged_dir "$LOGGED_DIR" --name "$RECIPE" --disabled_wandb true "${REST[@]}"
fi

IMAGE_SIDE=(--image_trainable); [ "$DATASET" = cc3m ] && IMAGE_SIDE=(--image_trainable false)  # as sh/buffer.sh
$(launcher) distill_ptm-st.py --dataset "$DATASET" --image_root "$(image_root_of "$DATASET")" \
    --ann_root "$ANN_ROOT" --image_encoder nfnet --text_encoder bert "${IMAGE_SIDE[@]}" \
    --lr_img 1000 --lr_txt 1000 --lr_lr 0.01 --lr_teacher_img 0.1 --lr_teacher_txt 0.1 --sim_type full \
    --ema_decay 0.99 --logged_dir "$LOGGED_DIR" --name "$RECIPE" \
    "${RECIPE_ARGS[@]}" "${REST[@]}"
