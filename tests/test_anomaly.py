"""Anomaly evaluation: labelled files read strictly, rows scored exactly as the service scores them,
the metrics against scikit-learn, and a quick run of the benchmark protocol on a shared table."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from tests.conftest import SHARED
from tests.service_helpers import digits_rows, serving
from training.anomaly import ServedScorer, benchmark, detection_metrics, markdown, read_labelled, write_report
from training.cli import main as train_main
from training.data import DataError

ADBENCH = SHARED / "data" / "adbench"


def labelled_digits(n: int = 120) -> tuple[np.ndarray, np.ndarray]:
    """Digits rows (normal) and uniform noise in the digits' range (anomalous)."""
    normal = digits_rows(n, start=1500)
    noise = np.random.default_rng(0).uniform(0, 16, size=(n // 6, 64)).astype(np.float32)
    return np.concatenate([normal, noise]), np.r_[np.zeros(n), np.ones(n // 6)].astype(np.int64)


def test_labelled_files_in_every_format(tmp_path):
    x, y = labelled_digits(30)
    header = ",".join([f"f{i}" for i in range(64)] + ["label"])
    lines = [header] + [",".join(map(str, [*row.tolist(), int(t)])) for row, t in zip(x, y, strict=True)]
    (tmp_path / "t.csv").write_text("\n".join(lines) + "\n")
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    np.savez(tmp_path / "t.npz", X=x, y=y)
    for got in (read_labelled(tmp_path / "t.csv", label_column="label"),
                read_labelled(tmp_path / "x.npy", labels=tmp_path / "y.npy"), read_labelled(tmp_path / "t.npz")):
        np.testing.assert_allclose(got[0], x, rtol=1e-6)
        np.testing.assert_array_equal(got[1], y)
    np.save(tmp_path / "bad.npy", np.where(y == 1, 2, 0))
    with pytest.raises(DataError, match="must be 0 .normal. or 1 .anomaly., got \\['0', '2'\\]"):
        read_labelled(tmp_path / "x.npy", labels=tmp_path / "bad.npy")
    (tmp_path / "words.csv").write_text("a,label\n1,normal\n2,weird\n")
    with pytest.raises(DataError, match="labels must be 0"):
        read_labelled(tmp_path / "words.csv", label_column="label")
    np.savez(tmp_path / "empty.npz", X=np.zeros((0, 3)), y=np.zeros(0))
    with pytest.raises(DataError, match="non-empty"):
        read_labelled(tmp_path / "empty.npz")
    np.save(tmp_path / "short.npy", y[:-1])
    with pytest.raises(DataError, match="labels"):
        read_labelled(tmp_path / "x.npy", labels=tmp_path / "short.npy")
    with pytest.raises(DataError, match="--labels"):
        read_labelled(tmp_path / "x.npy")


def test_metrics_agree_with_scikit_learn():
    from sklearn.metrics import average_precision_score, f1_score, roc_auc_score

    rng = np.random.default_rng(1)
    y = (rng.random(300) < 0.1).astype(int)
    score = rng.normal(size=300) + 2 * y
    m = detection_metrics(y, score, threshold=1.0)
    assert m["auroc"] == pytest.approx(roc_auc_score(y, score))
    assert m["auprc"] == pytest.approx(average_precision_score(y, score))
    assert m["f1"] == pytest.approx(f1_score(y, score > 1.0)) and m["flagged"] == int((score > 1.0).sum())
    with pytest.raises(DataError, match="one class"):
        detection_metrics(np.zeros(5), np.arange(5.0), 1.0)


@pytest.mark.anyio
async def test_scores_are_the_services_own(tiny_repo):
    x, _ = labelled_digits(40)
    scorer = ServedScorer.load(tiny_repo / "tiny" / "1")
    async with serving(tiny_repo, default_model="tiny", reload_interval=0) as (_, client):
        served = (await client.post("/anomaly-score", json={"inputs": x.tolist(), "version": 1})).json()
    np.testing.assert_allclose(scorer(x), served["score"], rtol=1e-6)
    assert served["score_name"] == scorer.manifest.default_score == "typicality"
    assert scorer.calibration("typicality").threshold == served["threshold"]


def test_evaluate_labelled_rows_from_the_command_line(tiny_repo, tmp_path, capsys):
    x, y = labelled_digits()
    np.savez(tmp_path / "rows.npz", X=x, y=y)
    assert train_main(["evaluate", str(tiny_repo / "tiny" / "1"), "--data", str(tmp_path / "rows.npz"), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["rows"] == 140 and r["anomalies"] == 20 and r["auroc"] > 0.9  # noise is easy to tell from digits
    assert set(r) >= {"auprc", "precision", "recall", "f1", "threshold", "score"}
    np.save(tmp_path / "x.npy", x[:, :10])
    np.save(tmp_path / "y.npy", y)
    assert train_main(["evaluate", str(tiny_repo / "tiny" / "1"), "--data", str(tmp_path / "x.npy"),
                       "--labels", str(tmp_path / "y.npy")]) == 2
    assert "the model takes 64" in capsys.readouterr().err


@pytest.mark.skipif(not ADBENCH.is_dir(), reason="../shared/data/adbench is not present")
def test_quick_benchmark_on_two_shared_tables(tmp_path):
    """The protocol on two tables, two workers, fixed seeds; the VAE is held to a floor, the baselines to
    the figures the shared README measured."""
    for name in ("38_thyroid", "6_cardio"):
        shutil.copy(ADBENCH / f"{name}.npz", tmp_path)
    result = benchmark(tmp_path, seeds=(1,), jobs=2, progress=False)
    thyroid, cardio = result["sets"]["38_thyroid"], result["sets"]["6_cardio"]
    assert thyroid["iforest_auroc_mean"] == pytest.approx(0.98, abs=0.01)  # the shared README's IsolationForest
    assert cardio["iforest_auroc_mean"] == pytest.approx(0.933, abs=0.03)
    assert thyroid["vae_auroc_mean"] > 0.9 and cardio["vae_auroc_mean"] > 0.85
    assert thyroid["runs"][0]["vae"]["rows"] == 1132 and set(result["mean_rank"]) == {"vae", "iforest", "ecod", "knn"}
    assert min(cardio[f"{m}_auroc_mean"] for m in ("ecod", "knn")) > 0.5
    table = markdown(result)
    assert "| 38_thyroid | 3772 x 6 |" in table and "| all sets (2) |" in table
    json_path, _ = write_report(result, tmp_path / "out")
    assert json_path.with_suffix(".png").stat().st_size > 10_000
    with pytest.raises(DataError, match="no 5_nope.npz"):
        benchmark(tmp_path, seeds=(1,), sets=["5_nope"], progress=False)


def test_the_benchmark_chooses_the_score_as_the_service_does(tmp_path, capsys):
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, 1, (10_400, 4)), rng.normal(5, 0.3, (600, 4))])
    np.savez(tmp_path / "toy.npz", X=x, y=np.r_[np.zeros(10_400), np.ones(600)])
    plain = benchmark(tmp_path, seeds=(1,), extra=["--epochs", "3"], progress=False)
    iwae = benchmark(tmp_path, seeds=(1,), extra=["--epochs", "3"], samples=8, progress=False)
    assert (plain["score"], iwae["score"]) == ("elbo", "iwae")
    assert "VAE score `iwae`, K = 8" in markdown(iwae) and "VAE score `elbo`)" in markdown(plain)
    # The same model and rows: elbo and iwae rank the planted cluster, and are measured as different scores.
    runs = plain["sets"]["toy"]["runs"][0]["vae"], iwae["sets"]["toy"]["runs"][0]["vae"]
    assert min(r["auroc"] for r in runs) > 0.95 and runs[0]["threshold"] != runs[1]["threshold"]
    assert runs[0]["rows"] == 3000  # ADBench's protocol: 11,000 rows subsampled to 10,000, 30 % of them tested
    with pytest.raises(SystemExit) as exit_:
        train_main(["benchmark-anomaly", "--data", str(tmp_path), "--seeds", "1", "--score", "unknown"])
    assert exit_.value.code == 2
    assert "invalid choice: 'unknown'" in capsys.readouterr().err


@pytest.mark.anyio
async def test_every_score_is_served_as_calibrated_and_equals_the_offline_scorer(tiny_repo):
    from tests.service_helpers import DEFAULT_MODEL

    x, _ = labelled_digits(30)
    scorer = ServedScorer.load(DEFAULT_MODEL)
    async with serving(DEFAULT_MODEL.parents[1], reload_interval=0) as (_, client):
        for score, k in (("elbo", 1), ("iwae", 64), ("complexity", 64), ("typicality", 1)):
            body = (await client.post("/anomaly-score", json={"inputs": x.tolist(), "score": score})).json()
            cal = scorer.calibration(score)  # type: ignore[arg-type]
            assert body["score_name"] == score and body["samples"] == k == cal.samples
            assert body["threshold"] == cal.threshold
            np.testing.assert_allclose(body["score"], scorer(x, score=score), rtol=1e-6)  # type: ignore[arg-type]
            np.testing.assert_allclose(body["percentile"], cal.percentile(np.asarray(body["score"])), rtol=1e-9)
        legacy = (await client.post("/anomaly-score", json={"inputs": x.tolist(), "samples": 8})).json()
        assert legacy["score_name"] == "iwae" and legacy["samples"] == 8  # samples > 1 still means IWAE
        r = await client.post("/anomaly-score", json={"inputs": x.tolist(), "score": "magic"})
        assert r.status_code == 422 and r.json()["error"]["field"] == "score"
    table = tiny_repo.parent / "table-repo"
    rows = np.random.default_rng(0).normal(size=(200, 5))
    np.save(tiny_repo.parent / "t.npy", rows)
    assert train_main(["--dataset", "npy", "--data", str(tiny_repo.parent / "t.npy"), "--epochs", "2",
                       "--output", str(table), "--name", "t", "--no-progress",
                       "--checkpoint", str(tiny_repo.parent / "t.pt")]) == 0
    async with serving(table, default_model="t", reload_interval=0) as (_, client):
        for score in ("complexity", "typicality"):
            r = await client.post("/anomaly-score", json={"inputs": rows[:2].tolist(), "score": score})
            assert r.status_code == 422 and "Bernoulli image models" in r.json()["error"]["message"]
        ok = await client.post("/anomaly-score", json={"inputs": rows[:2].tolist(), "score": "iwae"})
        assert ok.status_code == 200
        default = (await client.post("/anomaly-score", json={"inputs": rows[:2].tolist()})).json()
        assert default["score_name"] == "elbo"  # a table model has no typicality reference
    scorer = ServedScorer.load(table / "t" / "1")
    assert scorer.manifest.typicality is None and scorer.manifest.default_score == "elbo"
    np.testing.assert_array_equal(scorer(rows[:5]), scorer(rows[:5], score="elbo"))


@pytest.mark.anyio
async def test_the_complexity_score_is_the_likelihood_in_bits_minus_half_the_compressed_shape(tmp_path):
    """Checked against its definition: the served iwae (same K, same noise) in bits, minus half the zlib
    length of the bit-packed shape (pixels above half the maximum grey level)."""
    import zlib

    from tests.service_helpers import DEFAULT_MODEL

    x = digits_rows(20, start=1500)
    x[0] = 0.0  # a blank image: compresses to almost nothing
    async with serving(DEFAULT_MODEL.parents[1], reload_interval=0) as (_, client):
        iwae = (await client.post("/anomaly-score", json={"inputs": x.tolist(), "score": "iwae"})).json()
        body = (await client.post("/anomaly-score", json={"inputs": x.tolist(), "score": "complexity"})).json()
    bits = [8 * len(zlib.compress(np.packbits(row > 8.0).tobytes(), 9)) for row in x]
    expected = np.asarray(iwae["score"]) / np.log(2.0) - 0.5 * np.asarray(bits)
    np.testing.assert_allclose(body["score"], expected, rtol=1e-9)
    assert body["samples"] == iwae["samples"] == 64

    # An export calibrated for the first complexity formula still loads, but that score is refused
    # (its quantiles describe another formula) while the others are served.
    old = tmp_path / "repo" / "digits" / "1"
    shutil.copytree(DEFAULT_MODEL, old)
    manifest = json.loads((old / "model.json").read_text())
    manifest["calibrations"]["complexity"]["score"] = "complexity"
    (old / "model.json").write_text(json.dumps(manifest))
    async with serving(old.parents[1], reload_interval=0) as (_, client):
        r = await client.post("/anomaly-score", json={"inputs": x.tolist(), "score": "complexity"})
        assert r.status_code == 422 and r.json()["error"]["field"] == "score"
        assert "predates the formula served now" in r.json()["error"]["message"]
        assert (await client.post("/anomaly-score", json={"inputs": x.tolist(), "score": "iwae"})).status_code == 200
    with pytest.raises(DataError, match="no 'complexity' score"):
        ServedScorer.load(old)(x, score="complexity")


@pytest.mark.anyio
async def test_rows_far_outside_the_data_are_flagged_as_the_most_anomalous(tmp_path):
    """A row millions of standard deviations out used to overflow the posterior variance and score NaN
    (JSON null, not flagged): the most anomalous row went unnoticed."""
    rows = np.random.default_rng(0).normal(size=(200, 5))
    np.save(tmp_path / "t.npy", rows)
    assert train_main(["--dataset", "npy", "--data", str(tmp_path / "t.npy"), "--epochs", "2",
                       "--output", str(tmp_path / "repo"), "--name", "t", "--no-progress",
                       "--checkpoint", str(tmp_path / "t.pt")]) == 0
    far = [[1e6] * 5, [-1e30] * 5, [3e38] * 5]
    async with serving(tmp_path / "repo", default_model="t", reload_interval=0) as (_, client):
        for score in ("elbo", "iwae"):
            r = await client.post("/anomaly-score", json={"inputs": [*far, rows[0].tolist()], "score": score})
            assert r.status_code == 200, r.text
            body = r.json()
            assert all(np.isfinite(body["score"])) and all(np.isfinite(body["kl"])), body
            assert body["is_anomaly"] == [True, True, True, False]
            assert body["percentile"][:3] == [100.0, 100.0, 100.0]
            assert min(body["score"][:3]) > 1e6 * body["score"][3]


def test_the_chi_squared_tail_is_scipys_and_stays_finite_far_out():
    """scoring.chi2_3_logsf equals scipy's chi2.logsf(d2, 3) where that is finite, and keeps ranking
    rows far beyond where scipy's falls to -inf (a row a million units out must outscore one a thousand out)."""
    from scipy.stats import chi2

    from service.scoring import chi2_3_logsf

    d2 = np.array([0.0, 1e-6, 0.5, 3.0, 10.0, 100.0, 1000.0])
    np.testing.assert_allclose(chi2_3_logsf(d2), chi2.logsf(d2, 3), rtol=1e-9, atol=1e-12)
    far = chi2_3_logsf(np.array([1e4, 1e6, 1e12]))
    assert np.all(np.isfinite(far)) and np.all(np.diff(far) < 0)
    np.testing.assert_allclose(far[1], -5e5 + np.log(2 * np.sqrt(5e5 / np.pi)), rtol=1e-9)



@pytest.mark.anyio
async def test_a_request_cut_into_passes_scores_as_one_pass():
    """VAE_MAX_PASS_VALUES at its floor cuts K = 64 into one row per pass and K = 8 into two: the same
    scores, parts and explanations as one pass, for every score (the noise is shared by every row)."""
    from tests.service_helpers import DEFAULT_MODEL

    x = digits_rows(12, start=700)
    answers = []
    for pass_values in (1 << 20, 1024):
        async with serving(DEFAULT_MODEL.parents[1], reload_interval=0, max_pass_values=pass_values) as (_, client):
            answers.append([(await client.post("/anomaly-score", json={"inputs": x.tolist(), "score": score,
                                                                         "samples": k, "explain": True})).json()
                            for score, k in (("elbo", 1), ("iwae", 64), ("typicality", 1), ("complexity", 8))])
    for one, cut in zip(*answers, strict=True):
        for key in ("score", "reconstruction", "kl", "percentile", "is_anomaly", "explanation"):
            np.testing.assert_allclose(np.asarray(cut[key], dtype=float), np.asarray(one[key], dtype=float),
                                       rtol=1e-6, err_msg=key)
