"""`vae-train`: train a VAE and export it; `vae-train evaluate`: score an exported model."""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shlex
import sys
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from training.config import ModelConfig, TrainConfig
from training.data import DATASETS, DataError, load_dataset

IMAGE_DATASETS = ("digits", "mnist")
# Defaults that differ between images and tables. For tables they were chosen with
# `vae-train benchmark-anomaly` on the ADBench sets (README: the ablation): training data for anomaly
# detection holds anomalies, so fewer epochs, a trimmed loss and a second fit without the rows a short
# first fit (TrainConfig.first_fit) scores worst keep the model from learning them; a KL weight of 4
# makes the latent code costly, so rows off the bulk of the data are not explained away through it; and
# a variance per feature scores each feature on its own scale.
IMAGE_DEFAULTS: dict[str, Any] = {"epochs": 30, "trim": 0.0, "refit": 0.0, "beta": 1.0, "per_feature_logvar": False,
                                  "hidden": (128,), "latent_dim": 8}
# A small data set (a table of a few hundred rows) in batches of 128 would get one or two steps per epoch
# and stay untrained after the default epochs; its batches shrink so every epoch takes at least this many.
DEFAULT_BATCH_SIZE = 128
MIN_STEPS_PER_EPOCH = 8
TABLE_DEFAULTS: dict[str, Any] = {"epochs": 20, "trim": 0.1, "refit": 0.1, "beta": 4.0, "per_feature_logvar": True,
                                  "hidden": (128, 64), "latent_dim": 16}


def default_batch_size(train_rows: int) -> int:
    """DEFAULT_BATCH_SIZE, or for a small data set one that gives MIN_STEPS_PER_EPOCH steps per epoch."""
    return max(1, min(DEFAULT_BATCH_SIZE, math.ceil(train_rows / MIN_STEPS_PER_EPOCH)))


def default_name(args: argparse.Namespace) -> str:
    """A name for a model trained without --name: the data file's stem, else the dataset (+ -conditional)."""
    path = Path(args.data) if args.data else None
    if path is not None and not path.is_dir():
        base = re.sub(r"[^A-Za-z0-9_.-]+", "-", path.stem).lstrip("_.-")[:56]
        if base:
            return base
    return args.dataset + ("-conditional" if args.conditional else "")


def _hidden(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(s) for s in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not sizes or any(s < 1 for s in sizes):
        raise argparse.ArgumentTypeError(f"hidden sizes must be positive integers, got {text!r}")
    return sizes


def _positive(kind: Callable[[str], float]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value
    return parse


def train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vae-train",
        description="Train a VAE, export encoder and decoder to TorchScript and ONNX, verify them against "
                    "the eager model, and write models/<name>/<version>/. "
                    "Run `vae-train evaluate --help` to score an exported model (a dataset split, or labelled rows "
                    "for anomaly detection), `vae-train benchmark-anomaly --help` for the anomaly benchmark, and "
                    "`vae-train keygen --help` / `vae-train sign --help` to sign models, and `vae-train plot --help` "
                    "to draw a model as PNG files, `vae-train check-samples --help` to judge a conditional model's "
                    "samples.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    d = p.add_argument_group("data")
    d.add_argument("--dataset", choices=DATASETS, default="digits",
                   help="digits: scikit-learn's embedded 8x8 digits; mnist: IDX files or .npz; csv/npy: your table")
    d.add_argument("--data", metavar="PATH", help="file or folder for mnist, csv and npy")
    d.add_argument("--label-column", help="CSV column kept out of the features (the labels of --conditional)")
    d.add_argument("--labels", metavar="FILE", help="labels for an .npy table: .npy, or text with one per line")
    d.add_argument("--conditional", action="store_true",
                   help="a conditional VAE: encoder and decoder see the label (digits and mnist use their own "
                        "labels; csv/npy take --label-column / --labels); the service then takes `label`")
    d.add_argument("--binarize", choices=("none", "dynamic"), default="none",
                   help="dynamic: train on x ~ Bernoulli(grey level), drawn anew every epoch (Bernoulli images)")
    d.add_argument("--val-fraction", type=float, default=0.15,
                   help="share of rows held out for validation (digits, csv, npy; MNIST uses its test set)")
    m = p.add_argument_group("model")
    m.add_argument("--arch", choices=("mlp", "conv"), default="mlp")
    m.add_argument("--latent-dim", type=_positive(int), help="[default: 8 for images, 16 for csv/npy]")
    m.add_argument("--hidden", type=_hidden,
                   help="MLP layer widths, or conv channel counts, comma-separated (e.g. 400 or 32,64) "
                        "[default: 128 for images, 128,64 for csv/npy]")
    m.add_argument("--dense", type=int, default=0, metavar="WIDTH",
                   help="conv: a fully connected layer of this width between the convolutions and the latent")
    m.add_argument("--likelihood", choices=("bernoulli", "gaussian"),
                   help="decoder likelihood [default: bernoulli for images, gaussian for tables]")
    m.add_argument("--per-feature-variance", dest="per_feature_logvar", action=argparse.BooleanOptionalAction,
                   help="Gaussian decoder: learn one variance per feature (or one shared) "
                        "[default: per feature for csv/npy, shared for images]")
    m.add_argument("--fixed-logvar", type=float, metavar="V",
                   help="Gaussian decoder: fix the shared log-variance at V instead of learning it")
    t = p.add_argument_group("training")
    t.add_argument("--epochs", type=_positive(int), help="[default: 30 for images, 20 for csv/npy]")
    t.add_argument("--trim", type=float, metavar="SHARE",
                   help="leave each batch's highest-loss share of rows out of the step, for training data that "
                        "holds anomalies [default: 0 for images, 0.1 for csv/npy]")
    t.add_argument("--refit", type=float, metavar="SHARE",
                   help="train twice: the second fit, from scratch, leaves out this share of rows that the first "
                        "fit scores worst (likely anomalies) [default: 0 for images, 0.1 for csv/npy]")
    t.add_argument("--first-fit-epochs", type=_positive(int), metavar="N",
                   help="with --refit, epochs of the first fit, the one that picks the rows to leave out: a network "
                        "fits the bulk of the data before its rarer rows, so a short fit ranks them best "
                        "[default: a quarter of --epochs]")
    t.add_argument("--batch-size", type=_positive(int),
                   help=f"rows per step [default: {DEFAULT_BATCH_SIZE}, or for fewer than "
                        f"{DEFAULT_BATCH_SIZE * MIN_STEPS_PER_EPOCH} training rows, a size that still gives "
                        f"{MIN_STEPS_PER_EPOCH} steps per epoch]")
    t.add_argument("--lr", type=_positive(float), default=1e-3)
    t.add_argument("--lr-schedule", choices=("constant", "cosine"), default="constant",
                   help="cosine: decay the learning rate to lr/100 by the last epoch")
    t.add_argument("--beta", type=float, help="weight of the KL term [default: 1 for images, 4 for csv/npy]")
    t.add_argument("--warmup-epochs", type=int, default=0, help="anneal beta from 0 over this many epochs")
    t.add_argument("--seed", type=int, default=0, help="seeds the split, the initialisation and the noise")
    t.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    t.add_argument("--checkpoint", type=Path, help="checkpoint file [default: runs/<name>/checkpoint.pt]")
    t.add_argument("--resume", action="store_true", help="continue from the checkpoint if it exists")
    t.add_argument("--no-progress", action="store_true", help="no progress bar (epoch lines still print)")
    o = p.add_argument_group("output")
    o.add_argument("--name", help="model name; an existing model gets a new version. Without it the export is a "
                   "new model named after the data file (or the dataset), with -2, -3, ... when that name is taken")
    o.add_argument("--output", type=Path, default=Path("models"), help="model repository")
    o.add_argument("--sign", type=Path, metavar="KEY",
                   help="sign the export with this Ed25519 private key (PEM; `vae-train keygen` makes one)")
    return p


def sign_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vae-train sign",
                                description="Sign an exported model folder: writes model.sig, an Ed25519 signature "
                                            "over model.json (which holds every file's sha256).")
    p.add_argument("model", type=Path, help="model folder, e.g. models/digits/1")
    p.add_argument("--key", type=Path, required=True, help="Ed25519 private key (PEM)")
    return p


def keygen_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vae-train keygen",
                                description="Make an Ed25519 key pair for signing models: PREFIX.key (private, "
                                            "mode 600) and PREFIX.pub (for the service's VAE_TRUSTED_KEYS).")
    p.add_argument("prefix", type=Path, help="e.g. keys/signing")
    return p


def _model_command(prog: str, description: str, model_help: str = "model folder, e.g. models/digits/1"
                   ) -> argparse.ArgumentParser:
    """A subcommand on one model folder that reads the data its manifest records (or the data given)."""
    p = argparse.ArgumentParser(prog=prog, description=description,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("model", type=Path, help=model_help)
    p.add_argument("--dataset", choices=DATASETS, help="[default: the one recorded in the manifest]")
    p.add_argument("--data", metavar="PATH", help="[default: the path recorded in the manifest]")
    return p


def evaluate_parser() -> argparse.ArgumentParser:
    p = _model_command("vae-train evaluate", "Negative ELBO and importance-weighted -log p(x), nats per example, of "
                       "a dataset split, computed with an exported model's graphs.")
    p.add_argument("--split", choices=("train", "val", "test"), default="val")
    p.add_argument("--samples", type=_positive(int), default=1000, help="K for the importance-weighted estimate")
    p.add_argument("--runtime", choices=("onnx", "torchscript"), default="onnx")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--no-progress", action="store_true")
    a = p.add_argument_group("anomaly detection (labelled rows: --data FILE with labels)")
    a.add_argument("--label-column", help="CSV column of labels, 0 = normal, 1 = anomaly")
    a.add_argument("--labels", type=Path, metavar="FILE", help="labels (.npy of 0/1) for an .npy --data file")
    return p


def plot_parser() -> argparse.ArgumentParser:
    p = _model_command("vae-train plot", "Draw what a model has learned, as PNG files: a sample grid, reconstructions "
                       "beside their inputs, interpolation strips and a latent traversal (image models), a 2-D map of "
                       "the encoded validation set coloured by label, and the training curves.")
    p.add_argument("--out", type=Path, help="folder for the PNG files [default: docs/pictures/<name>-<version>]")
    p.add_argument("--seed", type=int, default=0, help="which samples and rows are drawn")
    return p


def check_samples_parser() -> argparse.ArgumentParser:
    p = _model_command("vae-train check-samples", "A conditional model's samples, judged: a classifier trained on the "
                       "model's training rows labels samples drawn for each class; prints the share labelled as the "
                       "class asked for.", model_help="a conditional model's folder")
    p.add_argument("--per-class", type=_positive(int), default=100, help="samples drawn per class")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p


def benchmark_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vae-train benchmark-anomaly",
        description="ADBench's protocol on every *.npz (X, y) in a folder: per seed a set over 10,000 rows "
                    "subsampled to 10,000 and a 70/30 split stratified on y, a VAE trained with the defaults on the "
                    "training split (labels unused), the test rows scored as the service scores them, and "
                    "IsolationForest, ECOD and KNN (PyOD) on the same split. Writes JSON, markdown and a PNG.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--data", type=Path, required=True, help="folder of .npz files holding X and y")
    p.add_argument("--seeds", default="1,2,3", help="comma-separated split and training seeds")
    p.add_argument("--sets", help="comma-separated file names without .npz, e.g. 6_cardio,38_thyroid [default: all]")
    p.add_argument("--jobs", type=_positive(int), default=max(1, min(os.cpu_count() or 1, 8)),
                   help="worker processes running (set, seed) pairs side by side (this machine's CPU count, at most 8)")
    p.add_argument("--out", type=Path, default=Path("bench/results"), help="where the JSON and markdown go")
    p.add_argument("--train-args", default="", help="extra vae-train flags for an ablation, e.g. '--epochs 10'")
    p.add_argument("--score", choices=("elbo", "iwae"),
                   help="the score to measure [default: elbo, or iwae when --samples > 1, as the service chooses]")
    p.add_argument("--samples", type=_positive(int), help="K samples for the score [default: the calibration's K]")
    p.add_argument("--no-progress", action="store_true")
    return p


def _anomaly_evaluation(args: argparse.Namespace) -> bool:
    """Whether `vae-train evaluate` was given labelled rows rather than a dataset split."""
    data = Path(args.data) if args.data else None
    if args.label_column or args.labels:
        return True
    if data is not None and data.suffix == ".npz" and data.is_file():
        with np.load(data, allow_pickle=False) as npz:
            return {"X", "y"} <= set(npz.files)
    return False


def run_training(args: argparse.Namespace, argv: list[str]) -> Path:
    from training.export import export_model
    from training.train import resolve_device, train, without_worst

    likelihood = args.likelihood or ("bernoulli" if args.dataset in IMAGE_DATASETS else "gaussian")
    data = load_dataset(args.dataset, args.data, likelihood=likelihood, seed=args.seed,
                        val_fraction=args.val_fraction, label_column=args.label_column,
                        min_rows=args.batch_size or 1, labels=args.labels)
    if args.conditional:
        data.with_classes()
    if args.binarize == "dynamic" and likelihood != "bernoulli":
        raise DataError("--binarize dynamic draws Bernoulli pixels; it needs --likelihood bernoulli")
    if args.dense and args.arch != "conv":
        raise DataError("--dense adds a layer to the conv architecture; an MLP's layers are --hidden")
    input_shape = data.input_shape  # kept even for an MLP, so callers may send shaped rows
    if args.arch == "conv" and len(data.input_shape) != 3:
        raise DataError(f"--arch conv needs image data; {args.dataset} rows are flat {list(data.input_shape)}")
    defaults = IMAGE_DEFAULTS if args.dataset in IMAGE_DATASETS else TABLE_DEFAULTS
    args.hidden = args.hidden or defaults["hidden"]
    args.latent_dim = args.latent_dim or defaults["latent_dim"]
    per_feature = defaults["per_feature_logvar"] if args.per_feature_logvar is None else args.per_feature_logvar
    model_cfg = ModelConfig(
        input_shape=input_shape, latent_dim=args.latent_dim, hidden=args.hidden, arch=args.arch,
        likelihood=likelihood,  # type: ignore[arg-type]  # argparse choices guarantee the literal
        learn_logvar=args.fixed_logvar is None,
        decoder_logvar=args.fixed_logvar if args.fixed_logvar is not None else 0.0,
        per_feature_logvar=bool(per_feature) and likelihood == "gaussian",
        dense=max(0, args.dense), num_classes=len(data.classes or ()),
    )
    trim = float(defaults["trim"] if args.trim is None else args.trim)
    refit = float(defaults["refit"] if args.refit is None else args.refit)
    beta = float(defaults["beta"] if args.beta is None else args.beta)
    if beta < 0:
        raise DataError(f"--beta must be >= 0, got {beta}")
    for flag, share in (("--trim", trim), ("--refit", refit)):
        if not 0.0 <= share < 1.0:
            raise DataError(f"{flag} must be in [0, 1), got {share}")
    if args.first_fit_epochs and refit == 0:
        raise DataError("--first-fit-epochs sets the first of --refit's two fits, and this run has no refit "
                        "(--refit 0, the default for images)")
    batch_size = args.batch_size or default_batch_size(len(data.x_train))
    cfg = TrainConfig(epochs=args.epochs or int(defaults["epochs"]), first_fit_epochs=args.first_fit_epochs or 0,
                      trim=trim, refit=refit, batch_size=batch_size,
                      lr=args.lr, beta=beta, warmup_epochs=args.warmup_epochs, seed=args.seed,
                      val_fraction=args.val_fraction, binarize=args.binarize, lr_schedule=args.lr_schedule)
    name = args.name or default_name(args)
    device = resolve_device(args.device)
    checkpoint = args.checkpoint or Path("runs") / name / "checkpoint.pt"
    print(f"training {args.arch} VAE on {args.dataset}: {len(data.x_train)} train / {len(data.x_val)} val rows, "
          f"input {list(data.input_shape)}, latent {args.latent_dim}, {likelihood}, device {device}")
    first = cfg.first_fit() if cfg.refit > 0 else cfg
    result = train(data, model_cfg, first, device=device, checkpoint=checkpoint, resume=args.resume,
                   progress=not args.no_progress)
    refitted: dict[str, Any] | None = None
    if cfg.refit > 0:
        data, refitted = without_worst(result.model, data, cfg.refit, cfg.seed, device)
        refitted.update(first_fit_epochs=first.epochs, first_fit_seconds=round(result.train_seconds, 2))
        print(f"refit: leaving out the {cfg.refit:.0%} of rows the first fit ({first.epochs} epoch"
              f"{'s' if first.epochs > 1 else ''}) scores worst "
              f"(-ELBO above {refitted['cut_off_nats']:.2f} nats: {refitted['train_rows_left_out']} training, "
              f"{refitted['val_rows_left_out']} validation rows) and training again from scratch")
        result = train(data, model_cfg, cfg, device=device, checkpoint=checkpoint.with_name(f"refit-{checkpoint.name}"),
                       resume=args.resume, progress=not args.no_progress)
    best = result.history[result.best_epoch - 1]
    training = {
        "command": shlex.join(["vae-train", *argv]),
        "config": asdict(cfg),
        "data": {"dataset": args.dataset, "path": args.data, "seed": args.seed, "val_fraction": args.val_fraction,
                 "label_column": args.label_column, "labels": args.labels, "conditional": args.conditional,
                 "binarize": args.binarize, "train_rows": len(data.x_train), "val_rows": len(data.x_val)},
        "refit": refitted,
        "best_epoch": result.best_epoch,
        "epochs_run": len(result.history),
        "train_seconds": round(result.train_seconds, 2),
        "device": str(device),
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "history": [asdict(h) for h in result.history],
    }
    metrics = {"val_neg_elbo": best.val_loss, "val_reconstruction": best.val_reconstruction,
               "val_kl": best.val_kl, "train_neg_elbo": best.train_loss}
    folder, manifest = export_model(result.model, data, name=name, output=args.output, training=training,
                                    metrics=metrics, sign=args.sign, new_model=args.name is None)
    worst = max(c.max_abs_diff for c in manifest.parity)
    print(f"best epoch {result.best_epoch}: validation -ELBO {best.val_loss:.3f} nats; "
          f"training took {result.train_seconds:.1f}s")
    if folder.parent.name != name:
        print(f"{args.output / name} exists, so this model is {folder.parent.name}, a model of its own "
              f"(pass --name {name} to add a version to {name} instead)")
    print(f"exported {folder} (TorchScript and ONNX match eager within {worst:.1e}; "
          f"anomaly threshold {manifest.calibration.threshold:.2f} nats at the "
          f"{manifest.calibration.threshold_level:.0%} quantile)")
    return folder


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv[:1] == ["benchmark-anomaly"]:
            from training.anomaly import benchmark, markdown, write_report

            args = benchmark_parser().parse_args(argv[1:])
            seeds = tuple(int(s) for s in args.seeds.split(","))
            report = benchmark(args.data, seeds=seeds, extra=shlex.split(args.train_args), score=args.score,
                               samples=args.samples, sets=args.sets.split(",") if args.sets else None, jobs=args.jobs,
                               progress=not args.no_progress)
            print(markdown(report), end="")
            paths = write_report(report, args.out)
            print(f"results: {paths[0]}, {paths[1]}")
            return 0
        if argv[:1] == ["evaluate"] and _anomaly_evaluation(evaluate_parser().parse_args(argv[1:])):
            from training.anomaly import evaluate_labelled

            args = evaluate_parser().parse_args(argv[1:])
            r = evaluate_labelled(args.model, Path(args.data), label_column=args.label_column, labels=args.labels,
                                  runtime=args.runtime)
            if args.json:
                print(json.dumps(r))
            else:
                print(f"{r['model']} v{r['version']} ({r['runtime']}) on {r['data']}: {r['rows']} rows, "
                      f"{r['anomalies']} anomalies")
                print(f"  AUROC {r['auroc']:.4f}   AUPRC {r['auprc']:.4f}")
                print(f"  at the served threshold {r['threshold']:.3f} nats ({r['threshold_level']:.0%} quantile): "
                      f"precision {r['precision']:.3f}, recall {r['recall']:.3f}, F1 {r['f1']:.3f} "
                      f"({r['flagged']} flagged)")
            return 0
        if argv[:1] == ["evaluate"]:
            from training.evaluate import evaluate

            args = evaluate_parser().parse_args(argv[1:])
            result = evaluate(args.model, dataset=args.dataset, data=args.data, split=args.split,
                              samples=args.samples, runtime=args.runtime, progress=not args.no_progress)
            if args.json:
                print(json.dumps(result))
            else:
                note = " (binarised, seeded)" if result["binarized"] else ""
                print(f"{result['model']} v{result['version']} ({result['runtime']}) on {result['dataset']} "
                      f"{result['split']}, {result['rows']} rows{note}:")
                k = f"K={result['samples']:<5}"
                if "negative_elbo" in result:
                    print(f"  negative ELBO      {result['negative_elbo']:.3f} nats/example "
                          f"(reconstruction {result['reconstruction']:.3f}, KL {result['kl']:.3f})")
                if "iw_nll_given_label" in result:
                    print(f"  -log p(x | y), {k} {result['iw_nll_given_label']:.3f} nats/example (the row's own label)")
                    print(f"  -log p(x), {k}     {result['iw_nll']:.3f} nats/example (labels marginalised "
                          "over the training prior)")
                elif "iw_nll" in result:
                    print(f"  -log p(x), {k} {result['iw_nll']:.3f} nats/example")
            return 0
        if argv[:1] == ["check-samples"]:
            from training.sample_check import check_samples

            args = check_samples_parser().parse_args(argv[1:])
            r = check_samples(args.model, per_class=args.per_class, seed=args.seed, dataset=args.dataset,
                              data=args.data)
            if args.json:
                print(json.dumps(r))
            else:
                judge = r["classifier_validation_accuracy"]
                print(f"{r['model']} v{r['version']}: {r['accuracy']:.1%} of samples labelled as the class asked for "
                      f"({r['samples_per_class']} per class; the classifier is {judge:.1%} accurate on held-out rows"
                      + ("" if r["classifier_converged"] else "; its fit stopped at the iteration cap") + ")")
                print("| class | " + " | ".join(r["per_class"]) + " |")
                print("|---|" + "---|" * len(r["per_class"]))
                print("| samples labelled as asked | " + " | ".join(f"{v:.0%}" for v in r["per_class"].values()) + " |")
            return 0
        if argv[:1] == ["plot"]:
            from service.folder import read_manifest
            from training.plot import plot

            args = plot_parser().parse_args(argv[1:])
            m = read_manifest(args.model)
            out = args.out or Path("docs") / "pictures" / f"{m.name}-{m.version}"
            for path in plot(args.model, out, dataset=args.dataset, data=args.data, seed=args.seed):
                print(path)
            return 0
        if argv[:1] == ["sign"]:
            from service.folder import read_manifest
            from service.signing import load_private_key, sign_folder

            args = sign_parser().parse_args(argv[1:])
            read_manifest(args.model)  # sign only a folder that verifies now
            sign_folder(args.model, load_private_key(args.key))
            print(f"signed {args.model} ({args.model / 'model.sig'})")
            return 0
        if argv[:1] == ["keygen"]:
            from service.signing import generate_keypair

            args = keygen_parser().parse_args(argv[1:])
            private, public = args.prefix.with_suffix(".key"), args.prefix.with_suffix(".pub")
            if private.exists() or public.exists():
                raise ValueError(f"{private} or {public} exists already; keys are never overwritten")
            args.prefix.parent.mkdir(parents=True, exist_ok=True)
            generate_keypair(private, public)
            print(f"private key {private} (keep it with whoever exports models); public key {public} "
                  "(give it to the service as VAE_TRUSTED_KEYS)")
            return 0
        run_training(train_parser().parse_args(argv), argv)
        return 0
    except (DataError, ValueError, FileNotFoundError) as e:
        print(f"vae-train: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
