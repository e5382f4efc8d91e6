"""Tables as users have them: id and other columns left out, columns matched by name (reordered when
the names match, named when they do not), headerless files refused unless asked for, and a one-line
message naming the file and the fix for every mistake (issue 20)."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import pytest

from service.folder import read_manifest
from training.cli import main as train_main
from training.score import main as score_main

COLUMNS = ["pressure", "flow", "temperature"]
QUICK = ["--epochs", "1", "--hidden", "8", "--latent-dim", "2", "--no-progress"]


def write(path: Path, header: list[str] | None, rows: list[list[object]]) -> Path:
    buffer = io.StringIO()
    w = csv.writer(buffer)
    if header is not None:
        w.writerow(header)
    w.writerows(rows)
    path.write_text(buffer.getvalue())
    return path


def table(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal([5.0, 1.0, 40.0], [1.0, 0.2, 3.0], (n, 3))


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tables")
    x = table(200)
    rows = [[f"id{i}", "pump A", *r] for i, r in enumerate(x.tolist())]
    data = write(root / "plant.csv", ["id", "site", *COLUMNS], rows)
    assert train_main(["--dataset", "csv", "--data", str(data), "--id-column", "id", "--ignore-columns", "site",
                       *QUICK, "--output", str(root / "models"), "--checkpoint", str(root / "c.pt")]) == 0
    return root / "models" / "plant" / "1"


def scores(path: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(path.read_text())))


def test_ids_and_ignored_columns_stay_out_of_the_features(model):
    m = read_manifest(model)
    assert m.feature_names == COLUMNS and m.input_dim == 3
    assert m.training["data"]["left_out"] == ["id", "site"]


def test_columns_are_matched_by_name_and_reordered(model, tmp_path, capsys):
    x = table(20, seed=1)
    ordered = write(tmp_path / "ordered.csv", ["id", *COLUMNS], [[f"r{i}", *r] for i, r in enumerate(x.tolist())])
    shuffled = write(tmp_path / "shuffled.csv", ["temperature", "id", "flow", "pressure"],
                     [[r[2], f"r{i}", r[1], r[0]] for i, r in enumerate(x.tolist())])
    for source, out in ((ordered, tmp_path / "a.csv"), (shuffled, tmp_path / "b.csv")):
        assert score_main([str(source), "--model-dir", str(model), "--id-column", "id", "-o", str(out),
                           "--no-progress"]) == 0
    a, b = scores(tmp_path / "a.csv"), scores(tmp_path / "b.csv")
    assert [r["id"] for r in a] == [r["id"] for r in b] == [f"r{i}" for i in range(20)]
    assert [r["score"] for r in a] == [r["score"] for r in b]  # the same rows, whatever the column order
    reversed_by_position = write(tmp_path / "reversed.csv", ["c", "b", "a"], [r[::-1] for r in x.tolist()])
    capsys.readouterr()
    assert score_main([str(reversed_by_position), "--model-dir", str(model), "-o", str(tmp_path / "c.csv"),
                       "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "missing ['pressure', 'flow', 'temperature']; not in the model ['c', 'b', 'a']" in err
    assert "--ignore-columns" in err and len(err.strip().splitlines()) == 1


def test_an_extra_column_is_named_until_it_is_left_out(model, tmp_path, capsys):
    x = table(10, seed=2)
    extra = write(tmp_path / "extra.csv", [*COLUMNS, "note"], [[*r, 7] for r in x.tolist()])
    out = tmp_path / "s.csv"
    assert score_main([str(extra), "--model-dir", str(model), "-o", str(out), "--no-progress"]) == 2
    assert "not in the model ['note']" in capsys.readouterr().err
    assert score_main([str(extra), "--model-dir", str(model), "-o", str(out), "--ignore-columns", "note",
                       "--no-progress"]) == 0


def test_evaluate_takes_the_same_column_flags(model, tmp_path, capsys):
    x = np.concatenate([table(60, seed=3), table(6, seed=4) * 3])
    y = [0] * 60 + [1] * 6
    labelled = write(tmp_path / "labelled.csv", ["id", "y", *COLUMNS[::-1]],
                     [[f"r{i}", t, *r[::-1]] for i, (t, r) in enumerate(zip(y, x.tolist(), strict=True))])
    assert train_main(["evaluate", str(model), "--data", str(labelled), "--label-column", "y", "--id-column", "id",
                       "--json"]) == 0
    assert capsys.readouterr().out.count('"auroc"') == 1


def test_a_headerless_csv_is_refused_unless_asked_for(tmp_path, capsys):
    data = write(tmp_path / "bare.csv", None, table(80).tolist())
    out = ["--output", str(tmp_path / "m"), "--checkpoint", str(tmp_path / "c.pt")]
    assert train_main(["--dataset", "csv", "--data", str(data), *QUICK, *out]) == 2
    err = capsys.readouterr().err
    assert "bare.csv: the first row is all numbers" in err and "--no-header" in err
    assert train_main(["--dataset", "csv", "--data", str(data), "--no-header", *QUICK, *out]) == 0
    folder = tmp_path / "m" / "bare" / "1"
    assert read_manifest(folder).feature_names == ["c0", "c1", "c2"]
    assert score_main([str(data), "--model-dir", str(folder), "--no-header", "-o", str(tmp_path / "s.csv"),
                       "--no-progress"]) == 0
    assert len(scores(tmp_path / "s.csv")) == 80  # the first row is scored too


@pytest.mark.parametrize(("rows", "needed"), [(2, 50), (5, 50), (49, 50)])
def test_too_few_rows_say_how_many_are_needed(tmp_path, capsys, rows, needed):
    data = write(tmp_path / "small.csv", COLUMNS, table(rows).tolist())
    assert train_main(["--dataset", "csv", "--data", str(data), *QUICK, "--output", str(tmp_path / "m"),
                       "--checkpoint", str(tmp_path / "c.pt")]) == 2
    err = capsys.readouterr().err
    assert f"small.csv: {rows} rows; training needs at least {needed}" in err


def test_a_file_given_as_the_wrong_dataset_kind_says_which_to_use(tmp_path, capsys):
    csv_file = write(tmp_path / "t.csv", COLUMNS, table(60).tolist())
    np.save(tmp_path / "t.npy", table(60))
    common = [*QUICK, "--output", str(tmp_path / "m"), "--checkpoint", str(tmp_path / "c.pt")]
    assert train_main(["--dataset", "npy", "--data", str(csv_file), *common]) == 2
    err = capsys.readouterr().err
    assert "t.csv is not an .npy file" in err and "--dataset csv" in err and "pickle" not in err
    assert train_main(["--dataset", "csv", "--data", str(tmp_path / "t.npy"), *common]) == 2
    err = capsys.readouterr().err
    assert "t.npy is a NumPy file, not a CSV" in err and "--dataset npy" in err and "codec" not in err


def test_a_string_column_is_named_with_the_fix(tmp_path, capsys):
    data = write(tmp_path / "words.csv", [*COLUMNS, "site"], [[*r, "pump A"] for r in table(60).tolist()])
    assert train_main(["--dataset", "csv", "--data", str(data), *QUICK, "--output", str(tmp_path / "m"),
                       "--checkpoint", str(tmp_path / "c.pt")]) == 2
    err = capsys.readouterr().err
    assert "words.csv, line 2, column 'site': 'pump A' is not a number" in err and "--ignore-columns site" in err
