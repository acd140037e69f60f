#!/usr/bin/env bash
# Download annotations and images into the folders the scripts expect, one dataset or several.
# Idempotent: finished steps leave a marker (or their files) and are skipped on rerun, so a rerun
# after an interruption continues, and a rerun with everything in place needs no network.
# Needs network, `hf` (pip install huggingface_hub), wget, unzip. Without network it stops at once and
# says what to download and where to put it.
# Usage: bash sh/prepare_data.sh DATASET [DATASET ...]   (flickr, coco, cc3m, stamps; default: flickr)
# stamps: the Tux Paint stamps (real photographs and drawings with English captions, GPL-2: never commit
#   them) from the Debian package tuxpaint-stamps-default, fetched with `apt-get download` (the Debian
#   registry is the only network it needs) and unpacked with `dpkg-deb -x`, then converted into
#   $STAMPS_DIR/images (NAME.png + NAME.txt; see distill_utils/data/stamps.py). STAMPS_SOURCE=DIR uses an
#   already extracted stamps folder (EXTRACTED/usr/share/tuxpaint/stamps) or an installed Tux Paint's
#   (/usr/share/tuxpaint/stamps, found by itself) instead of downloading. STAMPS_DIR default: ./data/stamps.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
  sed -n '2,/^set -euo/p' sh/prepare_data.sh | sed '$d; s/^# \{0,1\}//'
  exit 0
fi
STAMPS_DIR="${STAMPS_DIR:-./data/stamps}"
STAMPS_PACKAGE=tuxpaint-stamps-default

stamps_source() {  # prints the stamps folder to convert, fetching the package when none is at hand
  if [[ -n "${STAMPS_SOURCE:-}" ]]; then
    if [[ ! -d "$STAMPS_SOURCE" ]]; then
      echo "error: STAMPS_SOURCE=$STAMPS_SOURCE is not a folder: point it at EXTRACTED/usr/share/tuxpaint/stamps" >&2
      return 1
    fi
    echo "$STAMPS_SOURCE"; return 0
  fi
  if [[ -d /usr/share/tuxpaint/stamps ]]; then echo /usr/share/tuxpaint/stamps; return 0; fi
  local package="$STAMPS_DIR/package" extracted="$STAMPS_DIR/package/extracted"
  if [[ -d "$extracted/usr/share/tuxpaint/stamps" && -f "$package/.extracted" ]]; then
    echo "$extracted/usr/share/tuxpaint/stamps"; return 0
  fi
  if ! command -v apt-get >/dev/null || ! command -v dpkg-deb >/dev/null; then
    {
      echo "error: fetching the stamps needs apt-get and dpkg-deb (a Debian or Ubuntu machine). Elsewhere, download"
      echo "${STAMPS_PACKAGE}_*.deb from https://packages.debian.org/$STAMPS_PACKAGE, unpack it (dpkg-deb -x FILE.deb DIR,"
      echo "or: ar x FILE.deb && tar xf data.tar.xz -C DIR), then run: STAMPS_SOURCE=DIR/usr/share/tuxpaint/stamps bash sh/prepare_data.sh stamps"
    } >&2
    return 1
  fi
  mkdir -p "$package"
  if ! ls "$package"/${STAMPS_PACKAGE}_*.deb >/dev/null 2>&1; then
    echo "fetching $STAMPS_PACKAGE from the Debian registry into $package (about 160 MB)" >&2
    if ! (cd "$package" && apt-get download "$STAMPS_PACKAGE" >&2); then
      {
        echo "error: apt-get download $STAMPS_PACKAGE failed (no Debian registry reachable, or the package lists are"
        echo "stale: run apt-get update first). Or fetch the .deb elsewhere into $package, or set STAMPS_SOURCE to an"
        echo "extracted stamps folder, then run this again."
      } >&2
      return 1
    fi
  fi
  rm -rf "$extracted"
  dpkg-deb -x "$(ls "$package"/${STAMPS_PACKAGE}_*.deb | head -n 1)" "$extracted"
  touch "$package/.extracted"
  echo "$extracted/usr/share/tuxpaint/stamps"
}

if [[ " $* " == *" stamps "* ]]; then
  if [[ -f "$STAMPS_DIR/images/.prepared.json" ]]; then
    echo "stamps ready in $STAMPS_DIR/images (nothing to do)"
  else
    SOURCE="$(stamps_source)"
    ${PYTHON:-python3} -m distill_utils.app.stamps --source "$SOURCE" --out "$STAMPS_DIR/images"
  fi
  REMAINING=()
  for dataset in "$@"; do [[ "$dataset" == stamps ]] || REMAINING+=("$dataset"); done
  [[ ${#REMAINING[@]} -eq 0 ]] && exit 0
  set -- "${REMAINING[@]}"
fi
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
    *) echo "unknown dataset '$dataset': pass flickr, coco, cc3m or stamps" >&2; exit 2 ;;
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
