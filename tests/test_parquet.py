"""Parquet wherever tables go: vae-train reads it by suffix, vae-score reads it a record batch at a
time and writes Parquet (or CSV, .npy) with the id and kept columns carried through, and every path
gives the numbers the CSV path gives (issue 24)."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import pytest

from bench.server import Server
from service.folder import read_manifest
from tests.test_tables import COLUMNS, QUICK, table, write
from training.cli import main as train_main
from training.score import main as score_main

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")


def as_parquet(path: Path, columns: dict[str, list], row_group_size: int | None = None) -> Path:
    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)
    return path


def plant(n: int, seed: int) -> dict[str, list]:
    x = table(n, seed=seed)
    # Columns in another order than the model's, an id, a text column carried through, a numeric one left out.
    return {"temperature": x[:, 2].tolist(), "id": [f"id{i}" for i in range(n)], "site": ["pump A"] * n,
            "flow": x[:, 1].tolist(), "spare": [0.0] * n, "pressure": x[:, 0].tolist()}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same table trained from CSV and from Parquet, with the same seed."""
    root = tmp_path_factory.mktemp("parquet")
    columns = plant(200, seed=0)
    rows = [[columns["id"][i], columns["site"][i], *(columns[c][i] for c in COLUMNS)] for i in range(200)]
    sources = {"csv": write(root / "plant.csv", ["id", "site", *COLUMNS], rows),
               "parquet": as_parquet(root / "plant.parquet", {k: columns[k] for k in ("id", "site", *COLUMNS)})}
    out = {}
    for kind, data in sources.items():
        assert train_main(["--dataset", "csv", "--data", str(data), "--id-column", "id", "--ignore-columns", "site",
                           *QUICK, "--seed", "3", "--output", str(root / kind), "--checkpoint",
                           str(root / f"{kind}.pt")]) == 0
        out[kind] = root / kind / "plant" / "1"
    return out


def test_training_from_parquet_matches_training_from_csv(models):
    from_csv, from_parquet = read_manifest(models["csv"]), read_manifest(models["parquet"])
    assert from_parquet.feature_names == COLUMNS == from_csv.feature_names
    assert from_parquet.calibration.threshold == pytest.approx(from_csv.calibration.threshold, rel=1e-6)


def test_scores_from_parquet_equal_the_csv_path_with_ids_and_kept_columns(models, tmp_path):
    columns = plant(50, seed=1)
    source = as_parquet(tmp_path / "rows.parquet", columns, row_group_size=16)
    rows = [[columns["id"][i], columns["site"][i], *(columns[c][i] for c in COLUMNS)] for i in range(50)]
    as_csv = write(tmp_path / "rows.csv", ["id", "site", *COLUMNS], rows)
    model = str(models["csv"])
    common = ["--id-column", "id", "--keep-columns", "site", "--model-dir", model, "--no-progress", "--explain", "2"]
    assert score_main([str(as_csv), *common, "-o", str(tmp_path / "from-csv.csv")]) == 0
    assert score_main([str(source), *common, "--ignore-columns", "spare", "-o", str(tmp_path / "out.parquet")]) == 0
    assert score_main([str(source), *common, "--ignore-columns", "spare", "-o", str(tmp_path / "out.csv")]) == 0
    expected = list(csv.DictReader(io.StringIO((tmp_path / "from-csv.csv").read_text())))
    got = pq.read_table(tmp_path / "out.parquet")
    assert got.column_names == ["id", "site", "score", "percentile", "is_anomaly", "feature_1", "part_1",
                                "feature_2", "part_2"]
    assert got.column("id").to_pylist() == [r["id"] for r in expected] == columns["id"]
    assert got.column("site").to_pylist() == ["pump A"] * 50
    np.testing.assert_allclose(got.column("score").to_numpy(), [float(r["score"]) for r in expected], rtol=1e-12)
    assert got.column("is_anomaly").to_pylist() == [r["is_anomaly"] == "1" for r in expected]
    assert got.column("feature_1").to_pylist() == [r["feature_1"] for r in expected]
    assert (tmp_path / "out.csv").read_text() == (tmp_path / "from-csv.csv").read_text()


def test_a_parquet_file_is_read_a_batch_at_a_time_with_the_same_numbers(models, tmp_path, monkeypatch):
    import training.columnar

    columns = plant(300, seed=2)
    source = as_parquet(tmp_path / "big.parquet", columns, row_group_size=64)
    model = ["--model-dir", str(models["parquet"]), "--id-column", "id", "--ignore-columns", "site,spare",
             "--no-progress"]
    assert score_main([str(source), *model, "-o", str(tmp_path / "whole.npy")]) == 0
    seen: list[int] = []
    real = training.columnar.iter_parquet

    def small_batches(*args, **kwargs):
        features, total, batches = real(*args, **{**kwargs, "batch_rows": 37})
        return features, total, (seen.append(len(b.x)) or b for b in batches)

    monkeypatch.setattr(training.columnar, "iter_parquet", small_batches)
    assert score_main([str(source), *model, "-o", str(tmp_path / "batched.npy")]) == 0
    assert seen == [37] * 8 + [4]  # never more than one batch of rows in memory
    whole, batched = np.load(tmp_path / "whole.npy"), np.load(tmp_path / "batched.npy")
    assert batched.dtype.names == ("id", "score", "percentile", "is_anomaly")
    assert batched["id"].tolist() == columns["id"]
    np.testing.assert_array_equal(batched["score"], whole["score"])


def test_parquet_through_a_service_equals_in_process(models, tmp_path):
    source = as_parquet(tmp_path / "rows.parquet", plant(40, seed=4))
    flags = ["--id-column", "id", "--ignore-columns", "site,spare", "--no-progress"]
    with Server(model_dir=models["csv"].parents[1], default_model="plant", env={"VAE_RELOAD_INTERVAL": "0",
                                                                               "VAE_MAX_ROWS": "16"}) as server:
        assert score_main([str(source), *flags, "--url", server.url, "-o", str(tmp_path / "remote.parquet")]) == 0
    local_out = str(tmp_path / "local.parquet")
    assert score_main([str(source), *flags, "--model-dir", str(models["csv"]), "-o", local_out]) == 0
    remote, local = pq.read_table(tmp_path / "remote.parquet"), pq.read_table(tmp_path / "local.parquet")
    assert remote.column("id").to_pylist() == local.column("id").to_pylist()
    np.testing.assert_allclose(remote.column("score").to_numpy(), local.column("score").to_numpy(), rtol=1e-6)


@pytest.mark.parametrize("column,value,message", [
    ("flow", "fast", "column 'flow' is string, not numeric"),
    ("flow", None, "column 'flow' has 1 empty cells"),
    ("nope", None, "no column 'nope'"),
])
def test_bad_parquet_input_says_what_is_wrong(models, tmp_path, capsys, column, value, message):
    columns = plant(5, seed=5)
    if column in columns:
        columns[column] = [value] + [1.0] * 4 if value is None else [value] * 5
    source = as_parquet(tmp_path / "bad.parquet", columns)
    id_column = "nope" if column == "nope" else "id"
    assert score_main([str(source), "--model-dir", str(models["csv"]), "--id-column", id_column, "--ignore-columns",
                       "site,spare", "--no-progress", "-o", str(tmp_path / "out.parquet")]) == 2
    assert message in capsys.readouterr().err


def test_reading_holds_one_batch_not_the_file(tmp_path):
    """Arrow's own allocation count while 16 MB of values are read 1,000 rows (80 KB) at a time: a row
    group or two (1.6 MB each) and their buffers, not the file (pyarrow's pre-buffering held 26 MB)."""
    from training.columnar import iter_parquet

    x = np.random.default_rng(0).random((200_000, 20), dtype=np.float32)
    source = as_parquet(tmp_path / "wide.parquet", {f"f{j}": x[:, j] for j in range(20)}, row_group_size=20_000)
    _, rows, batches = iter_parquet(source, carry=[], batch_rows=1000)
    most = seen = 0
    for batch in batches:
        seen += len(batch.x)
        most = max(most, pa.total_allocated_bytes())
    assert seen == rows == 200_000 and most < 12 * 2**20


def test_benchmark_anomaly_reads_parquet_tables_as_it_reads_npz(tmp_path):
    from training.anomaly import benchmark

    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, 1, (1_900, 4)), rng.normal(5, 0.3, (100, 4))])
    y = np.r_[np.zeros(1_900), np.ones(100)]
    (tmp_path / "npz").mkdir()
    (tmp_path / "parquet").mkdir()
    np.savez(tmp_path / "npz" / "toy.npz", X=x, y=y)
    as_parquet(tmp_path / "parquet" / "toy.parquet", {**{f"x{j}": x[:, j] for j in range(4)}, "y": y.astype(int)})
    runs = [benchmark(tmp_path / kind, seeds=(1,), extra=["--epochs", "2"], progress=False)["sets"]["toy"]
            for kind in ("npz", "parquet")]
    assert runs[0]["rows"] == runs[1]["rows"] == 2_000 and runs[1]["features"] == 4
    for method in ("vae", "iforest"):
        assert runs[1][f"{method}_auroc_mean"] == pytest.approx(runs[0][f"{method}_auroc_mean"], abs=1e-9)
