# Shared by the recipes in sh/ (sourced, not run). Each recipe's usage is `bash sh/SCRIPT GPU DATASET|RECIPE
# [flags...]`: flags after the positional arguments go to the Python script, and argparse keeps the last
# value of a repeated flag, so any flag a recipe sets can be overridden.
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# Paths, each overridable from the environment (the scripts pass them as flags):
ANN_ROOT="${ANN_ROOT:-./data/Annotation/}"     # annotation JSON files
BUFFER_ROOT="${BUFFER_ROOT:-./buffer}"          # expert and shortcut trajectories
LOGGED_DIR="${LOGGED_DIR:-./logged_files}"      # distillation runs
RECIPES=(flickr500 flickr200 flickr100 coco500 coco200 coco100 cc3m500 cc3m200 cc3m100 stamps20 stamps50 stamps100)
STAMPS_DIR="${STAMPS_DIR:-./data/stamps}"       # sh/prepare_data.sh stamps: images in $STAMPS_DIR/images, split files beside
# The stamps recipes' model and expert settings, shared by buffer.sh, distill.sh and eval.sh (the values
# of the ablation's stamps settings, distill_utils/pipeline/settings.py STAMPS; docs/real_data.md says why):
# ImageNet EfficientNet-Lite0, frozen, at 96 px, MiniLM text features, projection heads 256 wide.
STAMPS_MODEL=(--image_size 96 --image_encoder efficientnet_lite0 --text_encoder minilm --image_pretrained true
              --image_trainable false --out_embedding 256 --num_workers 0)

is_stamps() { [[ "$1" == stamps* ]]; }
# the IMAGE_TEXT folder buffer.py names after the encoders, and the loss folder (stamps experts: no augmentation)
if [[ -z "${ENCODERS:-}" ]]; then ENCODERS_DEFAULT=1; fi
encoders_of() { if [[ -n "${ENCODERS_DEFAULT:-}" ]] && is_stamps "$1"; then echo efficientnet_lite0_minilm; else echo "${ENCODERS:-nfnet_bert}"; fi; }
loss_folder_of() { if is_stamps "$1"; then echo InfoNCE_NoAug; else echo InfoNCE; fi; }
ends_of() {  # phase k matches convexified_0_{ENDS[k]}, the authors' 0 -> 6 and 0 -> 8 of 10-epoch experts
  echo "${SHORTCUT_ENDS:-6 8}"
}
ann_root_of() { if is_stamps "$1" && [[ "$ANN_ROOT" == ./data/Annotation/ ]]; then echo "$STAMPS_DIR"; else echo "$ANN_ROOT"; fi; }

show_help() {  # the calling script's header comment
  sed -n '2,/^set -euo/p' "$1" | sed '$d; s/^# \{0,1\}//'
}

image_root_of() {  # IMAGE_ROOT overrides the dataset's default image folder
  if [[ -n "${IMAGE_ROOT:-}" ]]; then echo "$IMAGE_ROOT"; return; fi
  case "$1" in
    flickr) echo "./distill_utils/data/Flickr30k/" ;;
    coco) echo "./distill_utils/data/COCO/" ;;
    cc3m) echo "./distill_utils/data/CC3M/" ;;
    stamps) echo "$STAMPS_DIR/images" ;;
    *) echo "unknown dataset '$1': pass flickr, coco, cc3m or stamps" >&2; return 2 ;;
  esac
}

dataset_of_recipe() {  # flickr500 -> flickr
  local recipe="$1"
  if [[ ! " ${RECIPES[*]} " =~ " ${recipe} " ]]; then
    echo "unknown recipe '$recipe': pass one of ${RECIPES[*]}" >&2
    return 2
  fi
  [[ "$recipe" =~ ^(.*[^0-9])[0-9]+$ ]] && echo "${BASH_REMATCH[1]}"  # the size is the trailing number
}

normal_dir_of() { echo "$BUFFER_ROOT/$1/$(encoders_of "$1")/$(loss_folder_of "$1")/normal"; }

launcher() {  # NPROC=N runs the Python script under torchrun on N processes (one per visible GPU)
  if [[ -n "${NPROC:-}" && "${NPROC}" != "1" ]]; then
    echo "torchrun --standalone --nproc_per_node ${NPROC}"
  else
    echo "${PYTHON:-python}"
  fi
}

# `positional SCRIPT DEFAULT "$@"`: --help prints the script's header; no argument at all prints it as
# a usage error. Then GPU is the first argument (checked by gpu_list), NAME the second (DATASET or RECIPE; DEFAULT when
# absent) and REST the flags after them, for the Python script.
positional() {
  local script="$1" default="$2"
  shift 2
  if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then show_help "$script"; exit 0; fi
  if [[ $# -lt 1 ]]; then show_help "$script" >&2; exit 2; fi
  GPU_ARG="$1"  # as given (cpu stays cpu), for recipes that call other recipes
  GPU="$(gpu_list "$1" "$script")" || exit 2
  NAME="${2:-$default}"
  REST=("${@:3}")
}

# `gpu_list ARG SCRIPT`: the value for CUDA_VISIBLE_DEVICES: GPU indices (0 or 0,1,2,3), GPU-/MIG- UUIDs,
# or cpu (or "": no GPU, the scripts then run on the CPU). Anything else is refused, so a recipe or dataset name
# given without the GPU in front of it is never taken for the GPU list.
gpu_list() {
  local arg="$1" script="$2"
  if [[ "$arg" == "cpu" || -z "$arg" ]]; then echo ""; return 0; fi  # "" as CUDA_VISIBLE_DEVICES: no GPU too
  if [[ "$arg" =~ ^[0-9]+(,[0-9]+)*$ || "$arg" =~ ^(GPU|MIG)-[A-Za-z0-9/-]+(,(GPU|MIG)-[A-Za-z0-9/-]+)*$ ]]; then
    echo "$arg"; return 0
  fi
  echo "error: $script: the first argument is the GPU list (0, 0,1,2,3, or cpu), got '$arg'. Put the GPU first:" \
       "bash $script 0 $arg ... (or bash $script cpu $arg ... to run on the CPU)" >&2
  return 2
}
