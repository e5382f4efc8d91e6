"""`python -m bench.ood`: the out-of-distribution figures of the README's anomaly section, rerunnable.

Two measurements on MNIST, each through a model's exported graphs as the service scores:
- simple inputs (blank, constant, blurred, upscaled 8x8 digits, inverted) against the MNIST test set,
  for a model trained on every class;
- each held-out digit class against the other classes' test rows, for a model trained without it
  (the in-distribution case the complexity score must not lose).
AUROC per score; higher means the inputs are ranked as more anomalous than MNIST's own test rows.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score
from tqdm import tqdm

from service.manifest import ScoreName
from training.anomaly import ServedScorer
from training.cli import main as train_main
from training.data import Dataset, load_mnist

SCORES: tuple[ScoreName, ...] = ("elbo", "iwae", "complexity")
REPO = Path(__file__).resolve().parents[1]


def simple_inputs(mnist_test: np.ndarray) -> dict[str, np.ndarray]:
    """Inputs a likelihood model is known to find too likely (Nalisnick et al. 2019), 0..255, [N, 784]."""
    from scipy.ndimage import gaussian_filter, zoom
    from sklearn.datasets import load_digits

    rng = np.random.default_rng(0)
    digits = load_digits().images[:300] / 16.0 * 255.0
    return {
        "blank": np.zeros((100, 784)),
        "constant": np.repeat(rng.uniform(0, 255, (100, 1)), 784, axis=1),
        "blurred": np.stack([gaussian_filter(im.reshape(28, 28), 1.5) for im in mnist_test[:300]]).reshape(300, -1),
        "digits 8x8 upscaled": np.stack([np.pad(zoom(im, 3, order=1), 2) for im in digits]).reshape(300, -1),
        "inverted": 255.0 - mnist_test[300:600],
    }


def auroc(normal: np.ndarray, odd: np.ndarray) -> float:
    return float(roc_auc_score(np.r_[np.zeros(len(normal)), np.ones(len(odd))], np.r_[normal, odd]))


def train_mnist(x_train: np.ndarray, x_test: np.ndarray, folder: Path, epochs: int) -> ServedScorer:
    """The 784-400-20 MLP of tests/test_ood.py, `epochs` epochs on x_train; quietly."""
    data = folder / "mnist.npz"
    np.savez(data, x_train=x_train.reshape(-1, 28, 28).astype(np.uint8), x_test=x_test.reshape(-1, 28, 28)
             .astype(np.uint8))
    with contextlib.redirect_stdout(io.StringIO()):
        rc = train_main(["--dataset", "mnist", "--data", str(data), "--hidden", "400", "--latent-dim", "20",
                         "--epochs", str(epochs), "--output", str(folder), "--name", "mnist", "--no-progress",
                         "--checkpoint", str(folder / "ck.pt")])
    if rc != 0:
        raise RuntimeError(f"training failed (exit {rc})")
    return ServedScorer.load(folder / "mnist" / "1")


def scored(scorer: ServedScorer, x: np.ndarray) -> dict[str, np.ndarray]:
    x = np.clip(x, 0, 255).astype(np.float32)
    return {s: scorer(x, score=s) for s in SCORES}


def simple_input_aurocs(mnist: Dataset, epochs: int, normal_rows: int = 2000) -> dict[str, dict[str, float]]:
    with tempfile.TemporaryDirectory() as tmp:
        scorer = train_mnist(mnist.x_train, mnist.x_val, Path(tmp), epochs)
        normal = scored(scorer, mnist.x_val[1000 : 1000 + normal_rows])
        return {kind: {s: auroc(normal[s], v) for s, v in scored(scorer, x).items()}
                for kind, x in simple_inputs(mnist.x_val).items()}


def held_out_aurocs(mnist: Dataset, held: int, epochs: int, normal_rows: int = 3000) -> dict[str, float]:
    """A model trained without class `held`; AUROC of that class's test rows against the others'."""
    if mnist.y_train is None or mnist.y_val is None:
        raise ValueError(f"{mnist.source}: the held-out measurement needs MNIST's labels")
    with tempfile.TemporaryDirectory() as tmp:
        scorer = train_mnist(mnist.x_train[mnist.y_train != held], mnist.x_val, Path(tmp), epochs)
        normal = scored(scorer, mnist.x_val[mnist.y_val != held][:normal_rows])
        odd = scored(scorer, mnist.x_val[mnist.y_val == held])
        return {s: auroc(normal[s], odd[s]) for s in SCORES}


def markdown(result: dict) -> str:
    lines = ["| input | " + " | ".join(f"`{s}`" for s in SCORES) + " |", "|---" * (len(SCORES) + 1) + "|"]
    lines += [f"| {kind} | " + " | ".join(f"{v[s]:.3f}" for s in SCORES) + " |"
              for kind, v in result["simple"].items()]
    held = result["held_out"]
    lines += ["", "| held-out class | " + " | ".join(held) + " | mean |", "|---" * (len(held) + 2) + "|"]
    for s in SCORES:
        values = [held[c][s] for c in held]
        lines.append(f"| `{s}` | " + " | ".join(f"{v:.3f}" for v in values) + f" | {np.mean(values):.3f} |")
    lines += ["", f"{result['epochs']} epochs per model; run time {result['seconds']:.0f} s."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.ood", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mnist", type=Path, default=REPO.parent / "shared" / "data" / "mnist",
                   help="MNIST: a folder of IDX files or an .npz with x_train, y_train, x_test, y_test")
    p.add_argument("--classes", default="0,1,2,3,4,5,6,7,8,9", help="held-out classes to measure")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "ood")
    args = p.parse_args(argv)
    mnist = load_mnist(args.mnist)
    classes = [int(c) for c in args.classes.split(",")]
    started = time.time()
    with tqdm(total=1 + len(classes), unit="model", disable=None) as bar:
        bar.set_description("every class")
        simple = simple_input_aurocs(mnist, args.epochs)
        bar.update(1)
        held = {}
        for c in classes:
            bar.set_description(f"without class {c}")
            held[str(c)] = held_out_aurocs(mnist, c, args.epochs)
            bar.update(1)
    result = {"mnist": str(args.mnist), "epochs": args.epochs, "simple": simple, "held_out": held,
              "seconds": round(time.time() - started, 1)}
    report = markdown(result)
    args.out.mkdir(parents=True, exist_ok=True)
    base = args.out / f"ood_{time.strftime('%Y-%m-%d_%H%M')}"
    base.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    base.with_suffix(".md").write_text(report)
    print(report)
    print(f"results: {base}.json, {base}.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
