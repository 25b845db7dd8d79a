"""Write the small Fashion-MNIST slice shipped in the package (so the demo runs without the full set).

    python scripts/make_data_slice.py   # needs Debian's dataset-fashion-mnist

1,000 train-split images (a probe) and 2,000 test-split images, drawn with a fixed seed, as uint8.
"""

from pathlib import Path

import numpy as np

from autodac.datasets import DEFAULT_ROOT, _FILES, _read_idx


def main() -> None:
    rng = np.random.default_rng(0)
    arrays = {}
    for split, count in (("train", 1000), ("test", 2000)):
        images, labels = (_read_idx(Path(DEFAULT_ROOT) / name) for name in _FILES[split])
        index = np.sort(rng.choice(len(images), size=count, replace=False))
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = images[index], labels[index]
    out = Path(__file__).resolve().parents[1] / "autodac" / "data" / "fashion_mnist_slice.npz"
    np.savez_compressed(out, **arrays)


if __name__ == "__main__":
    main()
