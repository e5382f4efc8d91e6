"""`vae-score`: the same scores through a running service and in-process, ids carried through,
CSV and .npy out, and a clear error (the server's own message) for bad input."""

from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from bench.server import Server
from tests.service_helpers import digits_rows
from training.score import main as score_main


@pytest.fixture(scope="module")
def server(tiny_repo: Path) -> Iterator[Server]:
    s = Server(model_dir=tiny_repo, default_model="tiny", env={"VAE_MAX_ROWS": "64", "VAE_RELOAD_INTERVAL": "0"})
    yield s
    s.stop()


def write_csv(path: Path, x: np.ndarray) -> None:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["row_id", *[f"p{i}" for i in range(x.shape[1])]])
        for i, row in enumerate(x):
            w.writerow([f"r{i:04d}", *row.tolist()])


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_service_and_in_process_give_the_same_scores(server, tiny_repo, tmp_path):
    x = np.concatenate([digits_rows(150, start=1000), np.full((10, 64), 16.0, dtype=np.float32)])
    write_csv(tmp_path / "rows.csv", x)
    common = [str(tmp_path / "rows.csv"), "--id-column", "row_id", "--no-progress"]
    assert score_main([*common, "--url", server.url, "--version", "1", "-o", str(tmp_path / "remote.csv")]) == 0
    assert score_main([*common, "--model-dir", str(tiny_repo / "tiny" / "1"), "-o", str(tmp_path / "local.csv")]) == 0
    remote, local = read_csv(tmp_path / "remote.csv"), read_csv(tmp_path / "local.csv")
    assert list(remote[0]) == ["row_id", "score", "percentile", "is_anomaly"] and len(remote) == 160
    assert [r["row_id"] for r in remote] == [f"r{i:04d}" for i in range(160)] == [r["row_id"] for r in local]
    np.testing.assert_allclose([float(r["score"]) for r in remote], [float(r["score"]) for r in local], rtol=1e-6)
    assert [r["is_anomaly"] for r in remote] == [r["is_anomaly"] for r in local]
    assert all(r["is_anomaly"] == "1" for r in remote[150:])  # saturated rows are far outside the data
    np.save(tmp_path / "rows.npy", x)
    assert score_main([str(tmp_path / "rows.npy"), "--model-dir", str(tiny_repo / "tiny" / "1"), "--no-progress",
                       "-o", str(tmp_path / "local.npy")]) == 0
    table = np.load(tmp_path / "local.npy", allow_pickle=False)
    assert table.dtype.names == ("score", "percentile", "is_anomaly") and len(table) == 160
    np.testing.assert_allclose(table["score"], [float(r["score"]) for r in local], rtol=1e-12)


def test_bad_input_stops_with_a_clear_message(server, tiny_repo, tmp_path, capsys):
    np.save(tmp_path / "narrow.npy", np.zeros((3, 10)))
    assert score_main([str(tmp_path / "narrow.npy"), "--url", server.url, "--no-progress",
                       "-o", str(tmp_path / "o.csv")]) == 2
    assert "422 invalid_input" in capsys.readouterr().err  # the server's own error, not retried
    assert score_main([str(tmp_path / "narrow.npy"), "--model-dir", str(tiny_repo / "tiny" / "1"),
                       "-o", str(tmp_path / "o.csv")]) == 2
    assert "the model takes 64" in capsys.readouterr().err
    (tmp_path / "empty.csv").write_text("a,b\n")
    assert score_main([str(tmp_path / "empty.csv"), "--model-dir", str(tiny_repo / "tiny" / "1"),
                       "-o", str(tmp_path / "o.csv")]) == 2
    assert "no rows" in capsys.readouterr().err
    assert score_main([str(tmp_path / "narrow.npy"), "--url", server.url, "-o", str(tmp_path / "o.txt")]) == 2
    assert "--output must end in .csv, .npy or .parquet" in capsys.readouterr().err


def test_explain_through_the_service_equals_in_process(server, tiny_repo, tmp_path):
    np.save(tmp_path / "rows.npy", np.concatenate([digits_rows(70, start=500), np.full((3, 64), 16.0)]))
    outs = {}
    for where, flags in (("remote", ["--url", server.url, "--model", "tiny", "--version", "1"]),  # the suite adds v2
                         ("local", ["--model-dir", str(tiny_repo / "tiny" / "1")])):
        outs[where] = tmp_path / f"{where}.csv"
        assert score_main([str(tmp_path / "rows.npy"), *flags, "-o", str(outs[where]), "--explain", "3",
                           "--no-progress"]) == 0
    remote, local = read_csv(outs["remote"]), read_csv(outs["local"])
    assert len(remote) == 73 and remote[0].keys() == local[0].keys()  # 73 rows: two chunks of VAE_MAX_ROWS=64
    for a, b in zip(remote, local, strict=True):
        assert [a[f"feature_{j}"] for j in (1, 2, 3)] == [b[f"feature_{j}"] for j in (1, 2, 3)]
        assert float(a["part_1"]) == pytest.approx(float(b["part_1"]), rel=1e-5)
    assert remote[0]["feature_1"].startswith("x")  # digits pixels have no names: x0 .. x63


def test_a_url_that_does_not_answer_is_one_line_not_a_traceback(tmp_path, capsys):
    from bench.server import free_port

    np.save(tmp_path / "rows.npy", digits_rows(3))
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    assert score_main([str(tmp_path / "rows.npy"), "--url", url, "-o", str(tmp_path / "s.csv"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"vae-score: error: cannot reach {url}") and len(err.splitlines()) == 1, err
