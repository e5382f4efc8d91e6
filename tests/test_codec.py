"""The hand-written .npy reader and .npz writer agree with numpy's own."""

import io
import zipfile

import numpy as np
import pytest

from service.codec import encode_npz, parse_npy
from service.errors import InvalidInput, MalformedBody


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


@pytest.mark.parametrize("array", [
    np.arange(12, dtype=np.float32).reshape(3, 4),
    np.arange(6, dtype=">f8").reshape(2, 3),
    np.arange(5, dtype=np.int16),
    np.zeros((0, 64), dtype=np.float32),
    np.ones((2, 1, 8, 8), dtype=np.uint8),
    np.float32(3.5).reshape(()),
    np.asfortranarray(np.arange(6, dtype=np.float64).reshape(2, 3)),
])
def test_npy_reader_matches_numpy(array):
    got = parse_npy(npy(array))
    np.testing.assert_array_equal(got, array)
    assert got.dtype == array.dtype and got.shape == array.shape


@pytest.mark.parametrize(("body", "error"), [
    (b"junk", MalformedBody),
    (npy(np.ones((2, 3)))[:-8], MalformedBody),  # truncated data
    (npy(np.array(["a", "b"])), InvalidInput),
    (npy(np.array([True])), InvalidInput),
])
def test_npy_reader_refuses_bad_bodies(body, error):
    with pytest.raises(error):
        parse_npy(body)


def test_npz_writer_loads_with_numpy_without_pickle():
    payload = {"model": "digits", "version": 3, "mean": np.arange(6, dtype=np.float32).reshape(2, 3),
               "flags": np.array([True, False]), "t": np.linspace(0, 1, 5), "threshold": 1.5, "seed": None,
               "row": np.arange(4, dtype=np.float64)}
    loaded = np.load(io.BytesIO(encode_npz(payload)), allow_pickle=False)
    assert set(loaded.files) == {"model", "version", "mean", "flags", "t", "threshold", "row"}
    assert str(loaded["model"]) == "digits" and int(loaded["version"]) == 3
    np.testing.assert_array_equal(loaded["mean"], payload["mean"])
    np.testing.assert_array_equal(loaded["flags"], payload["flags"])
    np.testing.assert_array_equal(loaded["row"], payload["row"])
    assert loaded["threshold"] == 1.5


def test_npz_writer_writes_what_zipfile_writes(monkeypatch):
    """The direct writer's archive is byte for byte zipfile's for the same entries (its ZIP64 path, taken
    past 32-bit sizes, is zipfile itself: forced here with the limit at 0), and passes zipfile's CRC check."""
    from service import codec

    payload = {"model": "digits", "version": 3, "mean": np.arange(6, dtype=np.float32).reshape(2, 3),
               "seed": None, "labels": np.array(["0", "7"])}
    direct = encode_npz(payload)
    monkeypatch.setattr(codec, "_ZIP32_LIMIT", 0)
    assert encode_npz(payload) == direct
    archive = zipfile.ZipFile(io.BytesIO(direct))
    assert archive.testzip() is None
    assert archive.namelist() == ["model.npy", "version.npy", "mean.npy", "labels.npy"]


@pytest.mark.parametrize(("body", "expected"), [
    (b'{"inputs": [[1.0, 2e-5, -3]]}', False),
    (b'{"inputs": [[1.0, true]]}', True),
    (b'{"inputs": [[1.0]], "sample": false}', True),
    (b'{"test": "fft", "inputs": [[0]]}', False),
    (b'{"x": "truefalse"}', True),  # conservative: a string mentioning them only costs the exact scan
    (b"", False),
])
def test_may_hold_booleans(body, expected):
    from service.codec import may_hold_booleans

    assert may_hold_booleans(body) is expected
