"""`python -m bench.tables OUT`: anomaly tables beyond the five ADBench sets, to check the table defaults on
data they were not chosen on. Built the way ADBench and ODDS built theirs (one class, downsampled, is the
anomaly class), from data already here: scikit-learn's bundled copies of three UCI sets, and MNIST when
its files are at hand. Each is written as an `.npz` with X and y for `vae-train benchmark-anomaly`.

| file | from | normal rows | anomalies | as in |
| --- | --- | --- | --- | --- |
| wdbc.npz | breast cancer, 30 features | benign (357) | 10 malignant | ADBench WDBC |
| wine.npz | wine, 13 features | classes 1, 2 (119) | 10 of class 0 | ADBench wine |
| optdigits.npz | 8x8 digits, 64 features | digits 1-9 (1,619) | 48 zeros | ADBench optdigits (scaled to 1,797 rows) |
| mnist.npz | MNIST training set, 100 pixels | zeros (5,923) | 700 sixes | ODDS mnist |

MNIST's 100 pixels are the 100 of highest variance over the zeros and sixes (ODDS picked 100 at random).
The anomalies are drawn with a fixed seed, so every run builds the same files.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from training.data import load_mnist

REPO = Path(__file__).resolve().parents[1]
MNIST_PIXELS = 100


def one_class_out(x: np.ndarray, normal: np.ndarray, anomalous: np.ndarray, n_anomalies: int,
                  rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(X, y): every `normal` row (y = 0), then `n_anomalies` of the `anomalous` rows drawn without replacement."""
    picked = rng.choice(np.flatnonzero(anomalous), size=n_anomalies, replace=False)
    rows = np.concatenate([np.flatnonzero(normal), picked])
    y = np.r_[np.zeros(int(normal.sum()), dtype=np.int64), np.ones(n_anomalies, dtype=np.int64)]
    return x[rows].astype(np.float64), y


def build(mnist: Path | None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    from sklearn import datasets

    rng = np.random.default_rng(0)
    cancer, wine, digits = datasets.load_breast_cancer(), datasets.load_wine(), datasets.load_digits()
    tables = {
        "wdbc": one_class_out(cancer.data, cancer.target == 1, cancer.target == 0, 10, rng),
        "wine": one_class_out(wine.data, wine.target != 0, wine.target == 0, 10, rng),
        "optdigits": one_class_out(digits.data, digits.target != 0, digits.target == 0, 48, rng),
    }
    if mnist is not None:
        data = load_mnist(mnist)
        if data.y_train is None:
            raise SystemExit(f"{mnist}: MNIST labels are needed to build the mnist table")
        zeros, sixes = data.y_train == 0, data.y_train == 6
        pixels = np.sort(np.argsort(data.x_train[zeros | sixes].std(axis=0))[::-1][:MNIST_PIXELS])
        tables["mnist"] = one_class_out(data.x_train[:, pixels], zeros, sixes, 700, rng)
    return tables


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.tables", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path, help="folder for the .npz files")
    p.add_argument("--mnist", type=Path, default=REPO.parent / "shared" / "data" / "mnist",
                   help="MNIST (IDX folder or .npz with labels); the mnist table is left out when it is missing")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, (x, y) in build(args.mnist if args.mnist.exists() else None).items():
        np.savez(args.out / f"{name}.npz", X=x, y=y)
        print(f"{args.out / name}.npz: {x.shape[0]} rows x {x.shape[1]} features, {int(y.sum())} anomalies")
    print(f"next: vae-train benchmark-anomaly --data {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
