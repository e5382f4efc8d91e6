"""`python -m bench.ood`: the out-of-distribution figures of the README's anomaly section, rerunnable.

Measured through each model's exported graphs as the service scores, for an MLP and (with --arch conv)
a convolutional model, each trained with `vae-train`'s image defaults for --epochs epochs:
- the standard test for likelihood models (Nalisnick et al. 2019): a Fashion-MNIST model scoring the
  MNIST test set against Fashion-MNIST's, and an MNIST model scoring Fashion-MNIST's against MNIST's;
- simple inputs (blank, constant, blurred, upscaled 8x8 digits, inverted) against the MNIST test set,
  for the MNIST model;
- each held-out digit class against the other classes' test rows, for a model trained without it
  (the in-distribution case an out-of-distribution score must not lose).
AUROC per score; higher means the inputs are ranked as more anomalous than the model's own test rows.
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

SCORES: tuple[ScoreName, ...] = ("elbo", "iwae", "complexity", "typicality")
REPO = Path(__file__).resolve().parents[1]
NORMAL_ROWS = 3000  # test rows of the model's own data each comparison uses (rows 1,000-3,999 of its test set)
CALIBRATION_ROWS = 1000  # test rows 0-999 are the export's held-out rows: its calibrations, not measured here
# Each architecture's flags beyond the image defaults: the conv model is a small one (two strided
# convolutions and a dense layer), not one 128-channel convolution, which is what --hidden's default means for conv.
ARCH_FLAGS = {"mlp": ["--arch", "mlp"], "conv": ["--arch", "conv", "--hidden", "32,64", "--dense", "128"]}


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


def train(x_train: np.ndarray, x_test: np.ndarray, folder: Path, epochs: int, arch: str) -> ServedScorer:
    """`vae-train --dataset mnist` with the image defaults and `arch`'s flags, `epochs` epochs on x_train; quietly."""
    data = folder / "images.npz"
    np.savez(data, x_train=x_train.reshape(-1, 28, 28).astype(np.uint8), x_test=x_test.reshape(-1, 28, 28)
             .astype(np.uint8))
    with contextlib.redirect_stdout(io.StringIO()):
        rc = train_main(["--dataset", "mnist", "--data", str(data), *ARCH_FLAGS[arch], "--epochs", str(epochs),
                         "--output", str(folder), "--name", "model", "--no-progress",
                         "--checkpoint", str(folder / "ck.pt")])
    if rc != 0:
        raise RuntimeError(f"training failed (exit {rc})")
    return ServedScorer.load(folder / "model" / "1")


def scored(scorer: ServedScorer, x: np.ndarray) -> dict[str, np.ndarray]:
    x = np.clip(x, 0, 255).astype(np.float32)
    return {s: scorer(x, score=s) for s in SCORES}


def aurocs(normal: dict[str, np.ndarray], odd: dict[str, np.ndarray]) -> dict[str, float]:
    return {s: auroc(normal[s], odd[s]) for s in SCORES}


def pair_aurocs(own: Dataset, other: Dataset | None, epochs: int, arch: str) -> dict[str, dict[str, float]]:
    """A model trained on `own`: its test rows against `other`'s test rows, and (own = MNIST) against the
    simple inputs."""
    with tempfile.TemporaryDirectory() as tmp:
        scorer = train(own.x_train, own.x_val[:CALIBRATION_ROWS], Path(tmp), epochs, arch)
        normal = scored(scorer, own.x_val[1000 : 1000 + NORMAL_ROWS])
        result = {}
        if other is not None:
            result[f"{other.name} test"] = aurocs(normal, scored(scorer, other.x_val[:NORMAL_ROWS]))
        if own.name == "mnist":
            result |= {kind: aurocs(normal, scored(scorer, x)) for kind, x in simple_inputs(own.x_val).items()}
        return result


def held_out_aurocs(mnist: Dataset, held: int, epochs: int, arch: str) -> dict[str, float]:
    """A model trained without class `held`; AUROC of that class's test rows against the others'."""
    if mnist.y_train is None or mnist.y_val is None:
        raise ValueError(f"{mnist.source}: the held-out measurement needs MNIST's labels")
    with tempfile.TemporaryDirectory() as tmp:
        scorer = train(mnist.x_train[mnist.y_train != held], mnist.x_val[:CALIBRATION_ROWS], Path(tmp), epochs, arch)
        return aurocs(scored(scorer, mnist.x_val[mnist.y_val != held][:NORMAL_ROWS]),
                      scored(scorer, mnist.x_val[mnist.y_val == held]))


def markdown(result: dict) -> str:
    lines = []
    for arch, run in result["runs"].items():
        lines += [f"**{arch}** ({result['epochs']} epochs per model)", "",
                  "| model | inputs | " + " | ".join(f"`{s}`" for s in SCORES) + " |", "|---" * (len(SCORES) + 2) + "|"]
        for model, rows in run["pairs"].items():
            lines += [f"| {model} | {kind} | " + " | ".join(f"{v[s]:.3f}" for s in SCORES) + " |"
                      for kind, v in rows.items()]
        held = run.get("held_out") or {}
        if held:
            lines += ["", "| held-out class | " + " | ".join(held) + " | mean |", "|---" * (len(held) + 2) + "|"]
            for s in SCORES:
                values = [held[c][s] for c in held]
                lines.append(f"| `{s}` | " + " | ".join(f"{v:.3f}" for v in values) + f" | {np.mean(values):.3f} |")
        lines.append("")
    lines.append(f"Run time {result['seconds']:.0f} s.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.ood", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    shared = REPO.parent / "shared" / "data"
    p.add_argument("--mnist", type=Path, default=shared / "mnist",
                   help="MNIST: a folder of IDX files or an .npz with x_train, y_train, x_test, y_test")
    p.add_argument("--fashion", type=Path, default=shared / "fashion-mnist",
                   help="Fashion-MNIST, the same formats ('none': skip the pair)")
    p.add_argument("--arch", default="mlp,conv",
                   help=f"comma-separated architectures to measure: {', '.join(ARCH_FLAGS)}")
    p.add_argument("--classes", default="0,1,2,3,4,5,6,7,8,9",
                   help="held-out classes to measure, for the first architecture ('' for none)")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "ood")
    args = p.parse_args(argv)
    mnist = load_mnist(args.mnist)
    mnist.name = "mnist"
    fashion = None
    if str(args.fashion) != "none":
        fashion = load_mnist(args.fashion)
        fashion.name = "fashion-mnist"
    archs = [a for a in args.arch.split(",") if a]
    classes = [int(c) for c in args.classes.split(",") if c]
    started = time.time()
    runs: dict[str, dict] = {}
    total = len(archs) * (1 + (fashion is not None)) + len(classes)
    with tqdm(total=total, unit="model", disable=None) as bar:
        for i, arch in enumerate(archs):
            pairs = {}
            for own, other in ((mnist, fashion), (fashion, mnist)):
                if own is None:
                    continue
                bar.set_description(f"{arch} on {own.name}")
                pairs[own.name] = pair_aurocs(own, other, args.epochs, arch)
                bar.update(1)
            held = {}
            for c in classes if i == 0 else ():
                bar.set_description(f"{arch} without class {c}")
                held[str(c)] = held_out_aurocs(mnist, c, args.epochs, arch)
                bar.update(1)
            runs[arch] = {"pairs": pairs, "held_out": held}
    result = {"mnist": str(args.mnist), "fashion": str(args.fashion), "epochs": args.epochs, "runs": runs,
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
