"""Datasets: the embedded digits, MNIST files, and users' own tables (CSV / NumPy).

Every loader returns raw values (the caller's data space) plus the preprocessing fitted on the
training split, so the exported model can take raw values from callers.
"""

from __future__ import annotations

import csv
import gzip
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DATASETS: tuple[str, ...] = ("digits", "mnist", "csv", "npy")
MAX_CLASSES = 1000


class DataError(ValueError):
    """A dataset that cannot be used, with a message that says what and where."""


@dataclass(frozen=True)
class Preprocessing:
    """x_model = (x_raw - shift) / scale, per feature (length D) or shared (length 1)."""

    kind: str
    shift: np.ndarray
    scale: np.ndarray

    def apply(self, x: np.ndarray) -> np.ndarray:
        return ((x - self.shift) / self.scale).astype(np.float32)

    def to_dict(self) -> dict[str, object]:
        return {"kind": self.kind, "shift": self.shift.tolist(), "scale": self.scale.tolist()}

    def fitted_to(self, x_train: np.ndarray) -> Preprocessing:
        """The same kind of scaling fitted to other rows: a table's is fitted again; pixel scaling stays."""
        if self.kind in FITTED_KINDS:
            return fit_preprocessing(x_train, FITTED_KINDS[self.kind])
        return self


@dataclass
class Dataset:
    name: str
    source: str
    input_shape: tuple[int, ...]
    x_train: np.ndarray  # [N, D] float32, raw values
    x_val: np.ndarray
    preprocessing: Preprocessing
    y_train: np.ndarray | None = None
    y_val: np.ndarray | None = None
    feature_names: list[str] | None = None
    classes: list[str] | None = None  # set by `with_classes` for a conditional model
    label_index_train: np.ndarray | None = None  # int64 [N] indices into `classes`
    label_index_val: np.ndarray | None = None

    @property
    def input_dim(self) -> int:
        return math.prod(self.input_shape)

    def with_classes(self, semi_supervised: bool = False, labelled_per_class: int | None = None,
                     seed: int = 0) -> Dataset:
        """The labels as class indices, for a conditional model; classes are named as the data names them.

        `semi_supervised`: rows whose label is empty, NaN or -1 (UNLABELLED) are unlabelled, index -1;
        `labelled_per_class` N keeps N labels per class among the training rows (a seeded draw) and hides
        the rest, for experiments. Validation labels are kept, for the accuracy a run reports; training
        never reads them."""
        if self.y_train is None or self.y_val is None:
            raise DataError(f"{self.source}: a conditional model needs labels (for csv: --label-column; "
                            "for npy: --labels FILE)")
        if labelled_per_class is not None and not semi_supervised:
            raise DataError("--labelled-per-class hides labels for a semi-supervised model; add --semi-supervised")
        known_train = labelled(self.y_train) if semi_supervised else np.ones(len(self.y_train), dtype=bool)
        known_val = labelled(self.y_val) if semi_supervised else np.ones(len(self.y_val), dtype=bool)
        if not known_train.any():
            raise DataError(f"{self.source}: no training row has a label; a semi-supervised model needs a few "
                            "per class")
        classes = class_names(np.concatenate([self.y_train[known_train], self.y_val[known_val]]))
        index = {name: i for i, name in enumerate(classes)}

        def codes(y: np.ndarray, known: np.ndarray) -> np.ndarray:
            return np.array([index[str(v)] if k else -1 for v, k in zip(y, known, strict=True)], dtype=np.int64)

        train, val = codes(self.y_train, known_train), codes(self.y_val, known_val)
        if semi_supervised:
            if labelled_per_class is not None:
                train = keep_per_class(train, labelled_per_class, len(classes), seed)
            missing = [classes[c] for c in range(len(classes)) if not (train == c).any()]
            if missing:
                raise DataError(f"{self.source}: classes {missing[:5]} have no labelled training row; a "
                                "semi-supervised model learns each class from at least one")
        elif set(val.tolist()) - set(train.tolist()):
            unknown = sorted({classes[c] for c in set(val.tolist()) - set(train.tolist())})
            raise DataError(f"{self.source}: validation rows have labels the training rows lack: {unknown[:5]}")
        self.classes = classes
        self.label_index_train, self.label_index_val = train, val
        return self


# Label cells that mark a row as unlabelled for a semi-supervised model.
UNLABELLED = frozenset({"", "-1", "-1.0", "nan", "NaN", "None", "null"})


def labelled(y: np.ndarray) -> np.ndarray:
    """Which labels are given (not UNLABELLED), bool [N]."""
    return np.array([str(v).strip() not in UNLABELLED for v in y], dtype=bool)


def keep_per_class(index: np.ndarray, per_class: int, num_classes: int, seed: int) -> np.ndarray:
    """Class indices [N] with all but `per_class` labels of each class (a seeded draw) set to -1."""
    if per_class < 1:
        raise DataError(f"--labelled-per-class must be >= 1, got {per_class}")
    rng = np.random.default_rng(seed)
    out = np.full_like(index, -1)
    for c in range(num_classes):
        rows = np.flatnonzero(index == c)
        keep = rng.choice(rows, min(per_class, len(rows)), replace=False)
        out[keep] = c
    return out


def class_names(y: np.ndarray) -> list[str]:
    """Distinct labels as strings, in the data's natural order (numeric labels numerically)."""
    values = np.unique(y)
    if len(values) < 2:
        raise DataError(f"a conditional model needs at least 2 classes; the labels hold {len(values)}")
    if len(values) > MAX_CLASSES:
        raise DataError(f"{len(values)} distinct labels; a conditional model takes at most {MAX_CLASSES}")
    if np.issubdtype(values.dtype, np.floating) and np.all(values == np.round(values)):
        values = values.astype(np.int64)
    names = [str(v) for v in values]
    try:  # CSV labels arrive as text: "2" before "10"
        return sorted(names, key=float)
    except ValueError:
        return names


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic train/validation split: the same seed gives the same rows."""
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"validation fraction must be in (0, 1), got {val_fraction}")
    n_val = max(1, round(n * val_fraction))
    if n - n_val < 1:
        raise DataError(f"{n} rows are too few to split into training and validation")
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def check_finite(x: np.ndarray, source: str) -> None:
    bad = ~np.isfinite(x)
    if bad.any():
        row, col = np.argwhere(bad)[0]
        raise DataError(f"{source}: NaN or infinite value at row {row}, column {col} ({int(bad.sum())} in all)")


# Each kind of scaling fit_preprocessing makes, and the likelihood it makes it for.
FITTED_KINDS = {"standardize": "gaussian", "minmax": "bernoulli"}


def fit_preprocessing(x_train: np.ndarray, likelihood: str) -> Preprocessing:
    """Tabular data: standardise for a Gaussian decoder, min-max to [0, 1] for a Bernoulli one."""
    x = x_train.astype(np.float64)
    if likelihood == "gaussian":
        shift, scale, kind = x.mean(axis=0), x.std(axis=0), "standardize"
    else:
        shift, scale, kind = x.min(axis=0), x.max(axis=0) - x.min(axis=0), "minmax"
    # A constant column passes through unscaled. Constant is relative to the column's size: float32 rows
    # give a constant column a rounding-level std (~1e-7 of its value), and dividing by that would put
    # any other value millions of standard deviations out.
    constant = scale <= 1e-6 * np.maximum(np.abs(x).max(axis=0), 1.0)
    scale = np.where(constant, 1.0, scale)
    return Preprocessing(kind, shift.astype(np.float64), scale.astype(np.float64))


def _pixel_scaling(maximum: float) -> Preprocessing:
    return Preprocessing("scale", np.zeros(1), np.array([maximum], dtype=np.float64))


def load_digits(*, seed: int, val_fraction: float) -> Dataset:
    """scikit-learn's 8x8 digits (1797 rows, values 0..16), shipped inside the package: no download."""
    from sklearn.datasets import load_digits as sk_load_digits

    bunch = sk_load_digits()
    x = bunch.data.astype(np.float32)
    y = bunch.target.astype(np.int64)
    train, val = split_indices(len(x), val_fraction, seed)
    return Dataset(
        name="digits", source="sklearn.datasets.load_digits", input_shape=(1, 8, 8),
        x_train=x[train], x_val=x[val], y_train=y[train], y_val=y[val],
        preprocessing=_pixel_scaling(16.0),
    )


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 8:
        raise DataError(f"{path}: too short to be an IDX file")
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise DataError(f"{path}: not an unsigned-byte IDX file (magic {data[:4].hex()})")
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != math.prod(dims):
        raise DataError(f"{path}: header says {dims} ({math.prod(dims)} bytes) but holds {body.size}")
    return body.reshape(dims)


def _find_idx(folder: Path, stem: str) -> Path:
    for candidate in (folder / f"{stem}.gz", folder / stem):
        if candidate.exists():
            return candidate
    raise DataError(f"{folder}: missing {stem}(.gz)")


def load_mnist(path: Path) -> Dataset:
    """MNIST from the four IDX files (gzipped or not) in a folder, or an .npz with x_train/x_test.

    The validation split is the official test set, as in the PyTorch examples VAE.
    """
    if not path.exists():
        raise DataError(f"MNIST data not found: {path}")
    y_train = y_val = None
    if path.is_dir():
        x_train = _read_idx(_find_idx(path, "train-images-idx3-ubyte"))
        x_val = _read_idx(_find_idx(path, "t10k-images-idx3-ubyte"))
        try:
            y_train = _read_idx(_find_idx(path, "train-labels-idx1-ubyte")).astype(np.int64)
            y_val = _read_idx(_find_idx(path, "t10k-labels-idx1-ubyte")).astype(np.int64)
        except DataError:
            pass  # labels are only used for evaluation
    elif path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as npz:
            missing = {"x_train", "x_test"} - set(npz.files)
            if missing:
                raise DataError(f"{path}: missing arrays {sorted(missing)} (has {npz.files})")
            x_train, x_val = npz["x_train"], npz["x_test"]
            if "y_train" in npz.files and "y_test" in npz.files:
                y_train, y_val = npz["y_train"].astype(np.int64), npz["y_test"].astype(np.int64)
    else:
        raise DataError(f"{path}: give a folder of IDX files or an .npz file")
    for name, arr in (("training", x_train), ("test", x_val)):
        if arr.ndim != 3 or arr.shape[1:] != (28, 28):
            raise DataError(f"{path}: {name} images must have shape [N, 28, 28], got {list(arr.shape)}")
    maximum = 255.0 if x_train.dtype == np.uint8 or x_train.max() > 1.0 else 1.0
    x_train = x_train.reshape(len(x_train), -1).astype(np.float32)
    x_val = x_val.reshape(len(x_val), -1).astype(np.float32)
    check_finite(x_train, str(path))
    check_finite(x_val, str(path))
    return Dataset(
        name="mnist", source=str(path), input_shape=(1, 28, 28), x_train=x_train, x_val=x_val,
        y_train=y_train, y_val=y_val, preprocessing=_pixel_scaling(maximum),
    )


NPY_MAGIC, ZIP_MAGIC = b"\x93NUMPY", b"PK\x03\x04"
MIN_TRAIN_ROWS, MIN_VAL_ROWS = 16, 8  # rows to learn from, and held-out rows behind the anomaly threshold


def _starts_with(path: Path, magic: bytes) -> bool:
    with path.open("rb") as f:
        return f.read(len(magic)) == magic


def _is_number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


def read_csv_table(path: Path, label_column: str | None, *, drop: tuple[str, ...] | list[str] = (),
                   header: bool = True) -> tuple[np.ndarray, np.ndarray | None, list[str]]:
    """(features float64 [N, D], the label column or None, feature names) from a CSV.

    `label_column` and `drop` (ids, other columns to leave out) are kept out of the features. A first
    row of numbers is refused as a header unless `header` is False: then the columns are c0, c1, ...
    and matched by position."""
    if path.suffix == ".parquet":  # a Parquet table reads the same way: columns by name
        from training.columnar import read_parquet_table

        return read_parquet_table(path, label_column, drop=drop)
    if _starts_with(path, NPY_MAGIC) or _starts_with(path, ZIP_MAGIC):
        raise DataError(f"{path} is a NumPy file, not a CSV; for a table saved with np.save use --dataset npy")
    try:
        return _read_csv(path, label_column, tuple(drop), header)
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not a text CSV (byte {e.start} is not UTF-8); export the table as CSV") from None


def _read_csv(path: Path, label_column: str | None, drop: tuple[str, ...],
              header: bool) -> tuple[np.ndarray, np.ndarray | None, list[str]]:
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        try:
            first = [h.strip() for h in next(reader)]
        except StopIteration:
            raise DataError(f"{path}: the file is empty; expected a header row") from None
        if not header:
            names, pending = [f"c{i}" for i in range(len(first))], [first]
        elif first and all(_is_number(h) for h in first):
            raise DataError(f"{path}: the first row is all numbers, so it reads as data, not a header; add a header "
                            "row naming the columns (they are matched to the model by name), or pass --no-header "
                            "to take the columns by position")
        else:
            names, pending = first, []
        kept_out = [c for c in (label_column, *drop) if c is not None]
        missing = [c for c in kept_out if c not in names]
        if missing:
            raise DataError(f"{path}: no column {', '.join(map(repr, missing))}; the header is {names}")
        label_at = names.index(label_column) if label_column is not None else -1
        out_at = {names.index(c) for c in kept_out}
        features = [h for i, h in enumerate(names) if i not in out_at]
        rows: list[list[float]] = []
        labels: list[str] = []
        for line_no, record in enumerate([*pending, *reader], start=1 if pending else 2):
            if not record:
                continue
            if len(record) != len(names):
                raise DataError(f"{path}, line {line_no}: {len(record)} cells, the header has {len(names)}")
            row = []
            for i, cell in enumerate(record):
                if i == label_at:
                    labels.append(cell.strip())
                    continue
                if i in out_at:
                    continue
                try:
                    row.append(float(cell))
                except ValueError:
                    raise DataError(
                        f"{path}, line {line_no}, column {names[i]!r}: {cell!r} is not a number; leave the column "
                        f"out with --ignore-columns {names[i]} (or name it with --id-column / --label-column)"
                    ) from None
            rows.append(row)
    x = np.asarray(rows, dtype=np.float64).reshape(len(rows), len(features))
    y = np.asarray(labels) if label_column is not None else None
    return x, y, features


def column_list(text: str) -> tuple[str, ...]:
    """`--ignore-columns a,b` -> ("a", "b"), for every command that reads CSV tables."""
    return tuple(c.strip() for c in text.split(",") if c.strip())


def fewest_rows(val_fraction: float) -> int:
    """The smallest table that leaves MIN_TRAIN_ROWS to train on and MIN_VAL_ROWS held out."""
    n = MIN_TRAIN_ROWS + MIN_VAL_ROWS
    while max(1, round(n * val_fraction)) < MIN_VAL_ROWS or n - max(1, round(n * val_fraction)) < MIN_TRAIN_ROWS:
        n += 1
    return n


def align_columns(x: np.ndarray, names: list[str] | None, expected: list[str] | None, source: str) -> np.ndarray:
    """x's columns in the model's order, matched by header name against the manifest's feature names.

    Without names on either side (an .npy, a --no-header CSV, a model trained on an .npy) they are taken
    by position, and only their count is checked."""
    if names is None or expected is None or names == expected or all(n == f"c{i}" for i, n in enumerate(names)):
        if expected is not None and x.shape[1] != len(expected):
            raise DataError(f"{source}: rows have {x.shape[1]} features; the model takes {len(expected)}")
        return x
    missing = [c for c in expected if c not in names]
    extra = [c for c in names if c not in expected]
    if missing or extra:
        raise DataError(f"{source}: the columns do not match the model's features: "
                        + "; ".join(part for part in (f"missing {missing}" if missing else "",
                                                       f"not in the model {extra}" if extra else "") if part)
                        + (" (leave extra columns out with --ignore-columns, or name the id with --id-column)"
                           if extra else ""))
    return x[:, [names.index(c) for c in expected]]


def read_labels(path: Path, rows: int) -> np.ndarray:
    """A labels file for an .npy table: .npy (one label per row) or text (one per line)."""
    if not path.exists():
        raise DataError(f"labels file not found: {path}")
    if path.suffix == ".npy":
        try:
            y = np.load(path, allow_pickle=False)
        except ValueError as e:
            raise DataError(f"{path}: not a plain .npy array ({e})") from None
    else:
        y = np.array([line.strip() for line in path.read_text().splitlines() if line.strip()])
    if y.ndim != 1 or len(y) != rows:
        raise DataError(f"{path}: expected {rows} labels (one per row), got shape {list(y.shape)}")
    return y


def load_table(path: Path, *, kind: str, label_column: str | None, likelihood: str,
               seed: int, val_fraction: float, labels: Path | None = None, drop: tuple[str, ...] = (),
               header: bool = True) -> Dataset:
    """A user's numeric feature table; labels (a CSV column, or a file beside an .npy) are kept apart."""
    if not path.exists():
        raise DataError(f"data file not found: {path}")
    names: list[str] | None
    if kind == "csv":
        x, y, names = read_csv_table(path, label_column, drop=drop, header=header)
    else:
        if label_column is not None or drop:
            raise DataError("--label-column, --id-column and --ignore-columns apply to CSV files; a .npy file "
                            "holds features only")
        if not _starts_with(path, NPY_MAGIC):
            kind_of = "an .npz archive" if _starts_with(path, ZIP_MAGIC) else "not an .npy file"
            raise DataError(f"{path} is {kind_of}; --dataset npy takes an array saved with np.save "
                            "(a CSV table is --dataset csv)")
        try:
            x = np.load(path, allow_pickle=False)
        except ValueError as e:
            raise DataError(f"{path}: not a numeric .npy array ({e})") from None
        if x.ndim != 2:
            raise DataError(f"{path}: expected a 2-D array [rows, features], got shape {list(x.shape)}")
        if not np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.complexfloating):
            raise DataError(f"{path}: expected real numbers, got dtype {x.dtype}")
        x, names = x.astype(np.float64), None  # an array has no column names: scored by position
        y = read_labels(labels, len(x)) if labels is not None else None
    if x.shape[1] == 0:
        raise DataError(f"{path}: no feature columns")
    check_finite(x, str(path))
    if len(x) < fewest_rows(val_fraction):
        raise DataError(f"{path}: {len(x)} rows; training needs at least {fewest_rows(val_fraction)} "
                        f"({MIN_TRAIN_ROWS} to learn from and {MIN_VAL_ROWS} held out to set the anomaly threshold, "
                        f"at --val-fraction {val_fraction:g})")
    train, val = split_indices(len(x), val_fraction, seed)
    x_train = x[train]
    return Dataset(
        name=kind, source=str(path), input_shape=(x.shape[1],),
        x_train=x_train.astype(np.float32), x_val=x[val].astype(np.float32),
        y_train=None if y is None else y[train], y_val=None if y is None else y[val],
        feature_names=names, preprocessing=fit_preprocessing(x_train, likelihood),
    )


def load_dataset(name: str, path: str | Path | None = None, *, likelihood: str = "bernoulli",
                 seed: int = 0, val_fraction: float = 0.15, label_column: str | None = None,
                 min_rows: int = 1, labels: str | Path | None = None, drop: tuple[str, ...] = (),
                 header: bool = True) -> Dataset:
    """Load any supported dataset; `min_rows` is the batch size the training split must reach."""
    if name == "digits":
        data = load_digits(seed=seed, val_fraction=val_fraction)
    elif name in ("mnist", "csv", "npy"):
        if path is None:
            raise DataError(f"dataset {name!r} needs --data PATH")
        if name == "mnist":
            data = load_mnist(Path(path))
        else:
            data = load_table(Path(path), kind=name, label_column=label_column, likelihood=likelihood,
                              seed=seed, val_fraction=val_fraction, labels=None if labels is None else Path(labels),
                              drop=drop, header=header)
    else:
        raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if len(data.x_train) < min_rows:
        raise DataError(
            f"{data.source}: {len(data.x_train)} training rows, fewer than the batch size {min_rows}"
        )
    return data
