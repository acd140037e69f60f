#!/usr/bin/env bash
# Download annotations and images into the folders the scripts expect, one dataset or several.
# Idempotent: finished steps leave a marker (or their files) and are skipped on rerun, so a rerun
# after an interruption continues, and a rerun with everything in place needs no network.
# Needs network, `hf` (pip install huggingface_hub), wget, unzip. Without network it stops at once and
# says what to download and where to put it.
# Usage: bash sh/prepare_data.sh DATASET [DATASET ...]   (flickr, coco, cc3m, stamps, openclipart; default: flickr)
# stamps: the Tux Paint stamps (real photographs and drawings with English captions, GPL-2: never commit
#   them) from the Debian package tuxpaint-stamps-default, fetched with `apt-get download` (the Debian
#   registry is the only network it needs) and unpacked with `dpkg-deb -x`, then converted into
#   $STAMPS_DIR/images (NAME.png + NAME.txt; see distill_utils/data/stamps.py). STAMPS_SOURCE=DIR uses an
#   already extracted stamps folder (EXTRACTED/usr/share/tuxpaint/stamps) or an installed Tux Paint's
#   (/usr/share/tuxpaint/stamps, found by itself) instead of downloading. STAMPS_DIR default: ./data/stamps.
# openclipart: Debian's openclipart-png (public-domain clip art; about 130 MB) and wamerican (an English word
#   list for the captions), fetched and unpacked the same way, then converted into $OPENCLIPART_DIR/images
#   (at least 3,000 captioned pairs; see distill_utils/data/openclipart.py). OPENCLIPART_SOURCE=DIR uses an
#   extracted png folder (EXTRACTED/usr/share/openclipart/png) or an installed one (found by itself).
#   OPENCLIPART_DIR default: ./data/openclipart; WORDS_SOURCE=DIR: a folder holding american-english (the word
#   list). A variable set but empty is refused (unset it to fetch).
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
  sed -n '2,/^set -euo/p' sh/prepare_data.sh | sed '$d; s/^# \{0,1\}//'
  exit 0
fi
STAMPS_DIR="${STAMPS_DIR:-./data/stamps}"
OPENCLIPART_DIR="${OPENCLIPART_DIR:-./data/openclipart}"

# PACKAGE SUBFOLDER PACKAGE_DIR VARIABLE SIZE [ENTRY]: prints the folder SUBFOLDER of PACKAGE (holding ENTRY):
# VARIABLE's value when set, the installed one, or the package fetched and unpacked into PACKAGE_DIR
debian_folder() {
  local name="$1" sub="$2" package="$3" variable="$4" size="$5" entry="${6:-.}"
  local extracted="$3/extracted"
  if [[ -n "${!variable+set}" ]]; then
    local given="${!variable}"
    if [[ -z "$given" ]]; then
      echo "error: $variable is set but empty: unset it to fetch $name, or point it at EXTRACTED$sub" >&2
      return 1
    fi
    if [[ ! -d "$given" ]]; then
      echo "error: $variable=$given is not a folder: point it at EXTRACTED$sub (after dpkg-deb -x ${name}_*.deb EXTRACTED)" >&2
      return 1
    fi
    echo "$name: taking $given (from $variable)" >&2
    echo "$given"; return 0
  fi
  if [[ -e "$sub/$entry" ]]; then echo "$name: taking the installed $sub" >&2; echo "$sub"; return 0; fi
  if [[ -d "$extracted$sub" && -f "$package/.extracted" ]]; then echo "$extracted$sub"; return 0; fi
  if ! command -v apt-get >/dev/null || ! command -v dpkg-deb >/dev/null; then
    {
      echo "error: fetching $name needs apt-get and dpkg-deb (a Debian or Ubuntu machine). Elsewhere, download"
      echo "${name}_*.deb from https://packages.debian.org/$name, unpack it (dpkg-deb -x FILE.deb DIR, or:"
      echo "ar x FILE.deb && tar xf data.tar.xz -C DIR), then run this again with $variable=DIR$sub"
    } >&2
    return 1
  fi
  mkdir -p "$package"
  if ! ls "$package"/${name}_*.deb >/dev/null 2>&1; then
    echo "fetching $name from the Debian registry into $package ($size)" >&2
    if ! (cd "$package" && apt-get download "$name" >&2); then
      {
        echo "error: apt-get download $name failed (no Debian registry reachable, or the package lists are"
        echo "stale: run apt-get update first). Or fetch the .deb elsewhere into $package, or set $variable to"
        echo "an extracted folder (EXTRACTED$sub), then run this again."
      } >&2
      return 1
    fi
  fi
  rm -rf "$extracted"
  dpkg-deb -x "$(ls "$package"/${name}_*.deb | head -n 1)" "$extracted"
  touch "$package/.extracted"
  echo "$extracted$sub"
}

REMAINING=()
for dataset in "$@"; do
  case "$dataset" in
    stamps)
      if [[ -f "$STAMPS_DIR/images/.prepared.json" ]]; then
        echo "stamps ready in $STAMPS_DIR/images (nothing to do)"
      else
        SOURCE="$(debian_folder tuxpaint-stamps-default /usr/share/tuxpaint/stamps "$STAMPS_DIR/package" STAMPS_SOURCE \
          "about 160 MB")"
        ${PYTHON:-python3} -m distill_utils.app.stamps --source "$SOURCE" --out "$STAMPS_DIR/images"
      fi ;;
    openclipart)
      if [[ -f "$OPENCLIPART_DIR/images/.prepared.json" ]]; then
        echo "openclipart ready in $OPENCLIPART_DIR/images (nothing to do)"
      else
        SOURCE="$(debian_folder openclipart-png /usr/share/openclipart/png "$OPENCLIPART_DIR/package/openclipart-png" \
          OPENCLIPART_SOURCE "about 130 MB")"
        WORDS="$(debian_folder wamerican /usr/share/dict "$OPENCLIPART_DIR/package/wamerican" WORDS_SOURCE "under 1 MB" \
          american-english)"
        WORDS="$WORDS/american-english"
        ${PYTHON:-python3} -m distill_utils.app.openclipart --source "$SOURCE" --words "$WORDS" \
          --out "$OPENCLIPART_DIR/images"
      fi ;;
    *) REMAINING+=("$dataset") ;;
  esac
done
if [[ $# -gt 0 && ${#REMAINING[@]} -eq 0 ]]; then exit 0; fi
set -- "${REMAINING[@]+"${REMAINING[@]}"}"
ANN_ROOT=./data/Annotation
FLICKR_ROOT=./distill_utils/data/Flickr30k
COCO_ROOT=./distill_utils/data/COCO
CC3M_ROOT=./distill_utils/data/CC3M
CHECK_URL="${CHECK_URL:-https://huggingface.co}"
DATASETS=("${@:-flickr}")

done_marker() { [ -f "$1/.prepared" ]; }
mark_done() { touch "$1/.prepared"; }
root_of() { case "$1" in flickr) echo "$FLICKR_ROOT" ;; coco) echo "$COCO_ROOT" ;; cc3m) echo "$CC3M_ROOT" ;; esac; }

for dataset in "${DATASETS[@]}"; do
  case "$dataset" in
    flickr|coco|cc3m) ;;
    *) echo "unknown dataset '$dataset': pass flickr, coco, cc3m, stamps or openclipart" >&2; exit 2 ;;
  esac
done

needed=()
[ -f "$ANN_ROOT/flickr30k_train.json" ] || needed+=(annotations)
for dataset in "${DATASETS[@]}"; do
  done_marker "$(root_of "$dataset")" || needed+=("$dataset")
done
if [ ${#needed[@]} -eq 0 ]; then
  echo "data ready: annotations in $ANN_ROOT; ${DATASETS[*]} images in place (nothing to download)"
  exit 0
fi

where_to_put() {
  case "$1" in
    annotations) echo "  annotations: hf download previsior/PTM-ST --repo-type dataset --include 'Annotation/*' --local-dir ./data  -> $ANN_ROOT/*.json" ;;
    flickr) echo "  flickr: flickr30k-images.zip (Hugging Face dataset nlphuji/flickr30k) unzipped -> $FLICKR_ROOT/flickr30k-images/*.jpg, then: touch $FLICKR_ROOT/.prepared" ;;
    coco) echo "  coco: train2014.zip and val2014.zip from images.cocodataset.org unzipped -> $COCO_ROOT/train2014/, $COCO_ROOT/val2014/, then: touch $COCO_ROOT/.prepared" ;;
    cc3m) echo "  cc3m: the images listed in $ANN_ROOT/cc3m_captions_*.json (img2dataset) -> $CC3M_ROOT/<each entry's image path>, then: touch $CC3M_ROOT/.prepared" ;;
  esac
}

if ! ${PYTHON:-python3} - "$CHECK_URL" <<'PY'
import sys
import urllib.error
import urllib.request
try:
    urllib.request.urlopen(sys.argv[1], timeout=10)
except urllib.error.HTTPError:
    pass  # an answer, even an error page, means the network works
except Exception:
    sys.exit(1)
PY
then
  {
    echo "error: cannot reach $CHECK_URL: this machine seems to have no network. Download these where there is"
    echo "network (or run this script there) and copy them into this checkout, then run it again (finished"
    echo "steps are skipped):"
    for item in "${needed[@]}"; do where_to_put "$item"; done
  } >&2
  exit 1
fi
if ! command -v hf >/dev/null; then
  echo "error: the 'hf' command is missing: pip install huggingface_hub, then run this again" >&2
  exit 1
fi

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
  esac
done
echo "data ready: annotations in $ANN_ROOT"
