#!/usr/bin/env bash
# Download MuseTalk's released weights into the layout musetalk/models.py expects.
#
# Usage: scripts/download_weights.sh [--v1] [--no-face-parse] [MODELS_DIR]
#   MODELS_DIR        target folder (default: models), the server's --models_dir
#   --v1              also fetch the v1.0 UNet (musetalk/), ~3.4 GB more
#   --no-face-parse   skip BiSeNet face parsing (blend masks then come from landmarks)
# Environment: HF_ENDPOINT (default https://huggingface.co) to use a mirror.
#
# What lands where (about 3.9 GB for v1.5):
#   musetalkV15/musetalk.json, unet.pth       huggingface.co/TMElyralab/MuseTalk
#   musetalk/musetalk.json, pytorch_model.bin huggingface.co/TMElyralab/MuseTalk (--v1)
#   sd-vae/config.json, diffusion_pytorch_model.bin
#                                             huggingface.co/stabilityai/sd-vae-ft-mse
#   whisper/tiny.pt                           openai-whisper's tiny checkpoint (URL and
#                                             sha256 from whisper/__init__.py _MODELS)
#   face-parse-bisent/79999_iter.pth          huggingface.co/ManyOtherFunctions/face-parse-bisent
#                                             (a mirror of the BiSeNet face-parsing release;
#                                             original: Google Drive id 154JgKpzCPW82qINcVieuPH3fZ2e0P812)
#   face-parse-bisent/resnet18-5c106cde.pth   download.pytorch.org (torchvision ResNet-18)
#
# Idempotent: a non-empty file that is already there is kept (delete it to fetch it
# again). Each download goes to FILE.part (resumed if interrupted) and is renamed
# only when complete and, where a checksum is known, verified.
set -euo pipefail

HF_ENDPOINT="${HF_ENDPOINT:-https://huggingface.co}"
WHISPER_TINY_SHA256="65147644a518d12f04e32d6f3b26facc3f8dd46e5390956a9424a650c0ce22b9"
WHISPER_TINY_URL="https://openaipublic.azureedge.net/main/whisper/models/${WHISPER_TINY_SHA256}/tiny.pt"
RESNET18_URL="https://download.pytorch.org/models/resnet18-5c106cde.pth"
RESNET18_SHA256_PREFIX="5c106cde"  # torchvision names files by their sha256 prefix

models_dir="models"
want_v1=0
want_face_parse=1
for arg in "$@"; do
  case "$arg" in
    --v1) want_v1=1 ;;
    --no-face-parse) want_face_parse=0 ;;
    -h|--help) sed -n '2,27p' "$0"; exit 0 ;;
    -*) echo "unknown option: $arg (see --help)" >&2; exit 2 ;;
    *) models_dir="$arg" ;;
  esac
done

command -v curl >/dev/null || { echo "error: curl is required" >&2; exit 1; }

sha256_of() {
  if command -v sha256sum >/dev/null; then
    sha256sum "$1" | cut -d' ' -f1
  else
    shasum -a 256 "$1" | cut -d' ' -f1
  fi
}

# fetch URL DEST [SHA256_PREFIX]
fetch() {
  local url="$1" dest="$2" want="${3:-}"
  if [[ -s "$dest" ]]; then
    echo "have     $dest"
    return 0
  fi
  mkdir -p "$(dirname "$dest")"
  echo "download $url"
  echo "      -> $dest"
  if ! curl -fL --retry 3 --retry-delay 2 -C - -o "$dest.part" "$url"; then
    echo "error: download failed: $url (re-run to resume from $dest.part)" >&2
    exit 1
  fi
  if [[ -n "$want" ]]; then
    local got
    got="$(sha256_of "$dest.part")"
    if [[ "$got" != "$want"* ]]; then
      echo "error: checksum mismatch for $dest (sha256 $got, expected $want...); removed" >&2
      rm -f "$dest.part"
      exit 1
    fi
  fi
  mv "$dest.part" "$dest"
}

hf() {  # hf REPO PATH_IN_REPO DEST
  fetch "$HF_ENDPOINT/$1/resolve/main/$2" "$3"
}

echo "MuseTalk weights -> $models_dir"
hf TMElyralab/MuseTalk musetalkV15/musetalk.json "$models_dir/musetalkV15/musetalk.json"
hf TMElyralab/MuseTalk musetalkV15/unet.pth "$models_dir/musetalkV15/unet.pth"
if [[ "$want_v1" == 1 ]]; then
  hf TMElyralab/MuseTalk musetalk/musetalk.json "$models_dir/musetalk/musetalk.json"
  hf TMElyralab/MuseTalk musetalk/pytorch_model.bin "$models_dir/musetalk/pytorch_model.bin"
fi
hf stabilityai/sd-vae-ft-mse config.json "$models_dir/sd-vae/config.json"
hf stabilityai/sd-vae-ft-mse diffusion_pytorch_model.bin "$models_dir/sd-vae/diffusion_pytorch_model.bin"
fetch "$WHISPER_TINY_URL" "$models_dir/whisper/tiny.pt" "$WHISPER_TINY_SHA256"
if [[ "$want_face_parse" == 1 ]]; then
  hf ManyOtherFunctions/face-parse-bisent 79999_iter.pth "$models_dir/face-parse-bisent/79999_iter.pth"
  fetch "$RESNET18_URL" "$models_dir/face-parse-bisent/resnet18-5c106cde.pth" "$RESNET18_SHA256_PREFIX"
fi
echo "done. Check with: python -c \"from musetalk.models import find_weights; print(find_weights('$models_dir'))\""
