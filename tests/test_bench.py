"""The benchmark harness: targets and report from known figures, and one short real run."""

from __future__ import annotations

import json
import shutil

import pytest

from bench.raw import at_batch
from bench.report import markdown, plot, targets
from bench.workloads import MNIST_NAME, WORKLOADS, mnist_like_row


def synthetic_run() -> dict:
    def c(label: str, req: float, p50: float, p99: float, rows: int = 1, errors: int = 0) -> dict:
        w = next(w for w in WORKLOADS if w.label == label)
        return {"connections": w.connections, "single_row": w.single_row, "req_per_s": req, "rows_per_s": req * rows,
                "p50_ms": p50, "p95_ms": p99, "p99_ms": p99, "errors": errors, "mean_batch": 4.0}

    on = {w.label: c(w.label, 1000, 1, 2, w.rows) for w in WORKLOADS}
    on["encode 1 row c=1"] = c("encode 1 row c=1", 5000, 0.20, 0.3)
    on["encode 1 row c=64"] = c("encode 1 row c=64", 9000, 6.0, 30.0)  # p99 worse than TorchServe's below
    on["encode 64 rows JSON c=16"] = c("encode 64 rows JSON c=16", 470, 30, 40, rows=64)
    on["encode 64 rows npy c=16"] = c("encode 64 rows npy c=16", 2000, 5, 7, rows=64)
    on["encode 64 rows v2 binary c=16"] = c("encode 64 rows v2 binary c=16", 1600, 6, 8, rows=64)
    off = {"encode 1 row c=1": c("encode 1 row c=1", 5100, 0.19, 0.3)}
    peers = {
        "torchserve-batch64": {"cells": {"c=64": {"req_per_s": 4000, "rows_per_s": 4000, "p50_ms": 13, "p99_ms": 26,
                                                  "errors": 0}}},
        "fastapi-async": {"cells": {"c=1": {"req_per_s": 2000, "rows_per_s": 2000, "p50_ms": 0.48, "p99_ms": 0.8,
                                            "errors": 0}}},
        "pytriton-dynbatch64": {"cells": {"bulk": {"req_per_s": 170, "rows_per_s": 10880, "p50_ms": 90,
                                                   "p99_ms": 140, "errors": 0}}},
    }
    raw = {"onnx": {"1": 50000.0, "64": 300000.0, "256": 320000.0}}
    return {"started": "2026-01-01 00:00", "machine": "test", "duration_s": 10, "warmup_s": 3, "runtime": "onnx",
            "service": {"batching": {MNIST_NAME: on}, "no_batching": {MNIST_NAME: off}},
            "raw": {MNIST_NAME: raw}, "peers": peers, "target_model": MNIST_NAME}


def test_targets_compare_against_the_same_run():
    by_name = {t["target"]: t for t in targets(synthetic_run(), MNIST_NAME)}
    assert by_name["c=64 req/s >= 1.5x TorchServe"]["reference"] == 6000
    assert by_name["c=64 req/s >= 1.5x TorchServe"]["holds"] is True
    assert by_name["c=64 p99 <= TorchServe's"]["holds"] is False  # 30 ms > 26 ms
    assert by_name["c=64 zero errors"]["holds"] is True
    assert by_name["c=1 p50 <= naive FastAPI's"]["holds"] is True
    assert by_name["c=1 p50 within 10% of batching off"]["reference"] == pytest.approx(0.209)
    assert by_name["c=1 p50 within 10% of batching off"]["holds"] is True
    assert by_name["64 rows JSON c=16 rows/s >= 1.5x Triton"]["holds"] is True  # 30,080 >= 16,320
    npy = by_name["64 rows npy c=16 rows/s >= 50% of raw batch-64 (onnx)"]
    assert npy["reference"] == 150000 and npy["holds"] is False  # 128,000 < 150,000
    v2 = by_name["64 rows v2 binary c=16 rows/s >= 75% of npy's"]
    assert v2["reference"] == 96000 and v2["holds"] is True  # 102,400 >= 0.75 x 128,000


def test_targets_say_not_measured_without_peers():
    run = synthetic_run()
    run["peers"] = None
    by_name = {t["target"]: t for t in targets(run, MNIST_NAME)}
    assert by_name["c=64 req/s >= 1.5x TorchServe"]["holds"] is None
    assert by_name["c=64 zero errors"]["holds"] is True


def test_report_and_plot(tmp_path):
    run = synthetic_run()
    run["targets"] = targets(run, MNIST_NAME)
    text = markdown(run)
    assert "| encode 1 row c=64 | 9,000 | 9,000 | 6.00 |" in text
    assert "| c=64 p99 <= TorchServe's | 30.00 ms | 26.00 | **no** |" in text
    assert "torchserve-batch64" in text
    plot(run, tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_raw_limit_interpolates_on_log_batch():
    limits = {1: 100.0, 4: 300.0, 16: 500.0}
    assert at_batch(limits, 1) == 100 and at_batch(limits, 2) == pytest.approx(200)
    assert at_batch(limits, 8) == pytest.approx(400) and at_batch(limits, 64) == 500


def test_benchmark_row_looks_like_an_mnist_digit():
    row = mnist_like_row()
    assert len(row) == 784 and min(row) == 0 and max(row) <= 1
    assert 150 < sum(v > 0 for v in row) < 300


NATIVE_LOAD = pytest.mark.skipif(shutil.which("wrk") is None or shutil.which("h2load") is None,
                                 reason="wrk or h2load not installed (make test installs Debian's packages)")


def test_a_grpc_message_is_framed_as_grpc_frames_it():
    from bench.grpc_load import framed

    assert framed(b"abc") == b"\x00\x00\x00\x00\x03abc" and framed(b"") == b"\x00" * 5


@NATIVE_LOAD
def test_the_grpc_cell_counts_calls_the_server_refused_though_h2load_sees_http_200(shipped_server, tmp_path):
    from bench.cli import measure_cells
    from bench.workloads import Workload, digits_row, write_bodies

    bodies = write_bodies(tmp_path, digits_row(), "no-such-model")
    good = write_bodies(tmp_path / "good", digits_row(), "digits")
    cell = Workload("encode 1 row gRPC", "grpc:{model}.encode", "grpc1", 2, 1, "encoder")
    (refused,) = measure_cells(shipped_server, cell, bodies["grpc1"], model="no-such-model", seconds=[1])
    (served,) = measure_cells(shipped_server, cell, good["grpc1"], model="digits", seconds=[1])
    assert refused["result"].requests > 0 and refused["result"].errors == refused["result"].requests
    assert served["result"].requests > 0 and served["result"].errors == 0 and served["rows"] > 0


@NATIVE_LOAD
def test_a_short_real_run_writes_its_report(tmp_path):
    from bench.cli import main

    assert main(["--quick", "--duration", "1", "--warmup", "1", "--out", str(tmp_path)]) == 0
    (result,) = tmp_path.glob("*.json")
    run = json.loads(result.read_text())
    cells = run["service"]["batching"][MNIST_NAME]
    assert set(cells) == {w.label for w in WORKLOADS}
    assert all(c["errors"] == 0 and c["req_per_s"] > 0 for c in cells.values())
    assert cells["encode 1 row c=64"]["mean_batch"] > 1  # batches formed
    assert run["service"]["no_batching"][MNIST_NAME]["encode 1 row c=64"]["mean_batch"] == 1
    assert result.with_suffix(".md").exists() and result.with_suffix(".png").exists()
    assert "Peers not measured in this run: --quick" in result.with_suffix(".md").read_text()


def test_the_ood_benchmark_reports_every_score_for_every_kind_and_class(tmp_path, capsys):
    """`python -m bench.ood` on a stand-in for MNIST (sklearn's digits upscaled to 28x28, with labels)."""
    import numpy as np
    from scipy.ndimage import zoom
    from sklearn.datasets import load_digits

    from bench.ood import SCORES, main

    digits = load_digits()
    images = np.stack([np.pad(zoom(im, 3, order=1), 2) for im in digits.images]) / 16.0 * 255.0
    images = np.clip(images, 0, 255).astype(np.uint8)
    np.savez(tmp_path / "mnist.npz", x_train=images[:600], y_train=digits.target[:600],
             x_test=images[600:], y_test=digits.target[600:])
    # The same file stands in for Fashion-MNIST, so each model also scores the "other" data set.
    assert main(["--mnist", str(tmp_path / "mnist.npz"), "--fashion", str(tmp_path / "mnist.npz"), "--arch", "mlp",
                 "--classes", "7", "--epochs", "1", "--out", str(tmp_path / "out")]) == 0
    (result_file,) = (tmp_path / "out").glob("ood_*.json")
    run = json.loads(result_file.read_text())["runs"]["mlp"]
    simple = {"blank", "constant", "blurred", "digits 8x8 upscaled", "inverted"}
    assert set(run["pairs"]) == {"mnist", "fashion-mnist"}
    assert set(run["pairs"]["mnist"]) == {"fashion-mnist test", *simple}
    assert set(run["pairs"]["fashion-mnist"]) == {"mnist test"}
    assert set(run["held_out"]) == {"7"}
    rows = [*run["held_out"].values(), *(v for pair in run["pairs"].values() for v in pair.values())]
    for row in rows:
        assert set(row) == set(SCORES) and all(0.0 <= v <= 1.0 for v in row.values())
    # The upscaled digits and the stand-in "other" set are this model's own data: no score can tell them apart.
    assert abs(run["pairs"]["mnist"]["digits 8x8 upscaled"]["elbo"] - 0.5) < 0.2
    assert abs(run["pairs"]["mnist"]["fashion-mnist test"]["typicality"] - 0.5) < 0.1
    out = capsys.readouterr().out
    assert "| held-out class | 7 | mean |" in out and "| `typicality` |" in out
    assert "| fashion-mnist | mnist test |" in out


def test_the_extra_anomaly_tables_are_built_one_class_out_and_the_same_every_run(tmp_path, capsys):
    """`python -m bench.tables` on a stand-in MNIST: zeros are dark noise, sixes bright noise, threes any."""
    import numpy as np

    from bench.tables import main

    rng = np.random.default_rng(1)
    labels = np.repeat([0, 6, 3], 800)
    images = rng.integers(0, 256, (len(labels), 28, 28), dtype=np.uint8)
    images[labels == 0] //= 2
    images[labels == 6] = images[labels == 6] // 2 + 128
    np.savez(tmp_path / "mnist.npz", x_train=images, y_train=labels, x_test=images[:10], y_test=labels[:10])
    for out in ("a", "b"):
        assert main([str(tmp_path / out), "--mnist", str(tmp_path / "mnist.npz")]) == 0
    expected = {"wdbc": (367, 30, 10), "wine": (129, 13, 10), "optdigits": (1667, 64, 48), "mnist": (1500, 100, 700)}
    for name, (rows, features, anomalies) in expected.items():
        a, b = np.load(tmp_path / "a" / f"{name}.npz"), np.load(tmp_path / "b" / f"{name}.npz")
        assert a["X"].shape == (rows, features) and int(a["y"].sum()) == anomalies
        assert (a["X"] == b["X"]).all() and (a["y"] == b["y"]).all()
        assert (a["y"][: rows - anomalies] == 0).all()
    # The normal rows are the zeros and the anomalies are distinct sixes; no three is in it.
    mnist = np.load(tmp_path / "a" / "mnist.npz")
    assert mnist["X"][:800].max() < 128 <= mnist["X"][800:].min() and len(np.unique(mnist["X"][800:], axis=0)) == 700
    assert main([str(tmp_path / "c"), "--mnist", str(tmp_path / "none")]) == 0
    assert sorted(p.stem for p in (tmp_path / "c").glob("*.npz")) == ["optdigits", "wdbc", "wine"]
