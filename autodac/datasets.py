"""Fashion-MNIST from local IDX files (Debian's ``dataset-fashion-mnist``) or the slice shipped in the repo.

Nothing here downloads: the full set comes from ``/usr/share/datasets/fashion-mnist`` (or the
folder named by ``AUTODAC_FASHION_MNIST``), the small slice from the package itself.
Images are returned as float32 ``N x 1 x 28 x 28`` tensors normalised with the training
set's mean and standard deviation, which is what the shipped checkpoints were trained on.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch

from autodac.errors import AutodacError

__all__ = ["MEAN", "STD", "fashion_mnist", "fashion_mnist_slice", "normalize", "DEFAULT_ROOT"]

MEAN = 0.2860
STD = 0.3530
DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_SLICE = Path(__file__).with_name("data") / "fashion_mnist_slice.npz"


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as handle:
        raw = handle.read()
    dims = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims))
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def normalize(images_uint8: np.ndarray) -> torch.Tensor:
    """uint8 ``N x 28 x 28`` -> normalised float32 ``N x 1 x 28 x 28``."""
    images = torch.from_numpy(np.array(images_uint8, dtype=np.uint8, copy=True)).float().div_(255.0)
    return images.sub_(MEAN).div_(STD).unsqueeze(1)


def fashion_mnist(split: str = "test", root: str | os.PathLike | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The full Fashion-MNIST ``split`` ("train": 60k, "test": 10k) as ``(images, labels)``."""
    if split not in _FILES:
        raise AutodacError(f"`split` must be one of {sorted(_FILES)}, but got split={split!r}")
    folder = Path(root or os.environ.get("AUTODAC_FASHION_MNIST", DEFAULT_ROOT))
    paths = [folder / name for name in _FILES[split]]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST files not found: {missing}. Install Debian's `dataset-fashion-mnist` "
            "package or set AUTODAC_FASHION_MNIST to a folder holding the IDX .gz files."
        )
    images, labels = (_read_idx(p) for p in paths)
    return normalize(images), torch.from_numpy(labels.astype(np.int64))


def fashion_mnist_slice(split: str = "test") -> tuple[torch.Tensor, torch.Tensor]:
    """The slice shipped in the package: "train" (1,000 probe images) or "test" (2,000 images)."""
    if split not in _FILES:
        raise AutodacError(f"`split` must be one of {sorted(_FILES)}, but got split={split!r}")
    with np.load(_SLICE) as arrays:
        return normalize(arrays[f"{split}_images"]), torch.from_numpy(arrays[f"{split}_labels"].astype(np.int64))
