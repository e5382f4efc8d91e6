import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import SHARED
from training.data import DataError, load_dataset, split_indices


def write_idx(path: Path, array: np.ndarray, compress: bool) -> None:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)


@pytest.fixture
def mnist_folder(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    write_idx(tmp_path / "train-images-idx3-ubyte", rng.integers(0, 256, (30, 28, 28)), compress=True)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", rng.integers(0, 256, (10, 28, 28)), compress=False)
    write_idx(tmp_path / "train-labels-idx1-ubyte", rng.integers(0, 10, (30,)), compress=True)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", rng.integers(0, 10, (10,)), compress=True)
    return tmp_path


def test_digits_is_embedded_and_split_deterministically():
    a = load_dataset("digits", seed=3, val_fraction=0.2)
    b = load_dataset("digits", seed=3, val_fraction=0.2)
    c = load_dataset("digits", seed=4, val_fraction=0.2)
    assert a.input_shape == (1, 8, 8)
    assert a.x_train.shape == (1797 - 359, 64) and a.x_val.shape == (359, 64)
    np.testing.assert_array_equal(a.x_val, b.x_val)
    assert not np.array_equal(a.x_val, c.x_val)
    assert a.preprocessing.apply(a.x_train).max() == 1.0


def test_split_has_no_overlap_and_covers_all_rows():
    train, val = split_indices(100, 0.25, seed=0)
    assert len(val) == 25 and not set(train) & set(val) and len(set(train) | set(val)) == 100


def test_mnist_idx_files_gzipped_or_not(mnist_folder):
    data = load_dataset("mnist", mnist_folder)
    assert data.x_train.shape == (30, 784) and data.x_val.shape == (10, 784)
    assert data.y_train.shape == (30,)
    assert data.preprocessing.scale.tolist() == [255.0]


def test_mnist_npz(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "m.npz", x_train=rng.random((5, 28, 28)), x_test=rng.random((3, 28, 28)))
    data = load_dataset("mnist", tmp_path / "m.npz")
    assert data.x_val.shape == (3, 784) and data.preprocessing.scale.tolist() == [1.0]


@pytest.mark.parametrize(("make", "message"), [
    (lambda p: p / "nowhere", "not found"),
    (lambda p: (np.savez(p / "a.npz", x_train=np.zeros((4, 10, 10)), x_test=np.zeros((2, 10, 10))), p / "a.npz")[1],
     r"shape \[N, 28, 28\]"),
    (lambda p: (np.savez(p / "b.npz", x_train=np.zeros((4, 28, 28))), p / "b.npz")[1], "missing arrays"),
    (lambda p: (p / "c.txt").write_text("x") and p / "c.txt", "folder of IDX files or an .npz"),
])
def test_mnist_errors(tmp_path, make, message):
    with pytest.raises(DataError, match=message):
        load_dataset("mnist", make(tmp_path))


def test_mnist_folder_without_images(tmp_path):
    with pytest.raises(DataError, match="missing train-images-idx3-ubyte"):
        load_dataset("mnist", tmp_path)


@pytest.mark.skipif(not (SHARED / "data" / "mnist").is_dir(), reason="../shared/data/mnist is not present")
def test_real_mnist_files():
    data = load_dataset("mnist", SHARED / "data" / "mnist")
    assert data.x_train.shape == (60000, 784) and data.x_val.shape == (10000, 784)
    assert 0.12 < data.preprocessing.apply(data.x_train).mean() < 0.14


def write_csv(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_csv_with_label_column_is_standardised_on_the_training_split(tmp_path):
    rows = "\n".join(f"{i},{2 * i + 1},{'ab'[i % 2]}" for i in range(40))
    path = write_csv(tmp_path / "t.csv", "a,b,label\n" + rows + "\n")
    data = load_dataset("csv", path, likelihood="gaussian", label_column="label", val_fraction=0.25)
    assert data.feature_names == ["a", "b"] and data.input_shape == (2,)
    assert data.x_train.shape == (30, 2) and set(data.y_train) == {"a", "b"}
    z = data.preprocessing.apply(data.x_train)
    np.testing.assert_allclose(z.mean(0), 0, atol=1e-6)
    np.testing.assert_allclose(z.std(0), 1, atol=1e-5)
    np.testing.assert_allclose(data.preprocessing.shift, data.x_train.mean(0), rtol=1e-6)


def test_csv_bernoulli_uses_min_max(tmp_path):
    path = write_csv(tmp_path / "t.csv", "a,b\n" + "\n".join(f"{i},5" for i in range(60)))
    data = load_dataset("csv", path, likelihood="bernoulli")
    z = data.preprocessing.apply(data.x_train)
    assert z.min() >= 0 and z.max() <= 1 and data.preprocessing.kind == "minmax"


@pytest.mark.parametrize(("text", "message"), [
    ("a,b\n1,2\n3,x\n", r"line 3, column 'b': 'x' is not a number"),
    ("a,b\n1,2\n3,nan\n", "NaN or infinite value at row"),
    ("a,b\n1,2\n3,inf\n", "NaN or infinite"),
    ("a,b\n1,2\n3\n", "line 3: 1 cells, the header has 2"),
    ("", "empty"),
])
def test_csv_errors(tmp_path, text, message):
    with pytest.raises(DataError, match=message):
        load_dataset("csv", write_csv(tmp_path / "t.csv", text), val_fraction=0.5)


def test_csv_unknown_label_column(tmp_path):
    with pytest.raises(DataError, match=r"no column 'y'; the header is \['a', 'b'\]"):
        load_dataset("csv", write_csv(tmp_path / "t.csv", "a,b\n1,2\n3,4\n"), label_column="y", val_fraction=0.5)


def test_fewer_rows_than_a_batch(tmp_path):
    path = write_csv(tmp_path / "t.csv", "a\n" + "\n".join(str(i) for i in range(100)))
    with pytest.raises(DataError, match="85 training rows, fewer than the batch size 128"):
        load_dataset("csv", path, min_rows=128)


def test_npy_table_and_its_errors(tmp_path):
    np.save(tmp_path / "ok.npy", np.arange(120, dtype=np.float32).reshape(60, 2))
    assert load_dataset("npy", tmp_path / "ok.npy").x_train.shape[1] == 2
    np.save(tmp_path / "3d.npy", np.zeros((2, 2, 2)))
    with pytest.raises(DataError, match="2-D array"):
        load_dataset("npy", tmp_path / "3d.npy")
    np.save(tmp_path / "nan.npy", np.array([[1.0], [np.nan]]))
    with pytest.raises(DataError, match="NaN"):
        load_dataset("npy", tmp_path / "nan.npy", val_fraction=0.5)
    np.save(tmp_path / "str.npy", np.array([["a"], ["b"]]))
    with pytest.raises(DataError, match="real numbers"):
        load_dataset("npy", tmp_path / "str.npy")


def test_unknown_dataset_and_missing_path():
    with pytest.raises(DataError, match="unknown dataset"):
        load_dataset("imagenet")
    with pytest.raises(DataError, match="needs --data"):
        load_dataset("csv")


def test_a_constant_column_in_float32_passes_through_unscaled():
    """float32 rounding gives a constant column a std of ~1e-7 of its value; scaling by it put a test row
    that differs by 14 at 3e7 standard deviations (cardio, after the refit left out its rare values)."""
    from training.data import fit_preprocessing

    rng = np.random.default_rng(0)
    x = np.c_[np.full(1000, -0.0614), rng.normal(3.0, 2.0, 1000)].astype(np.float32)
    assert x[:, 0].std() > 0  # the rounding this guards against
    for likelihood in ("gaussian", "bernoulli"):
        p = fit_preprocessing(x, likelihood)
        assert p.scale[0] == 1.0
        assert p.scale[1] == pytest.approx(2.0 if likelihood == "gaussian" else np.ptp(x[:, 1]), rel=0.05)
