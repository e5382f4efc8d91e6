"""One `vae-train` run: its flags, the defaults that differ between images and tables, training
and export. `training.cli` parses the command line into it; `training.anomaly`'s benchmark trains
through it too, so neither imports the other.
"""

from __future__ import annotations

import argparse
import math
import platform
import re
import shlex
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from training.config import ModelConfig, TrainConfig
from training.data import DATASETS, DataError, Dataset, column_list, load_dataset

if TYPE_CHECKING:
    from training.model import VAE
    from training.stack import Stack

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
# A semi-supervised image model (chosen on digits with 5 labels per class, seeds 0-3; README): a small latent
# leaves the class to y, where the decoder must use it, and its classifier needs many more steps than a
# VAE needs to fit the digits.
SEMI_SUPERVISED_IMAGE_DEFAULTS: dict[str, Any] = {**IMAGE_DEFAULTS, "epochs": 200, "hidden": (512,), "latent_dim": 4,
                                                  "lr_schedule": "cosine", "vat_weight": 1.0}
# M2 of M1+M2 (--stack-on), over M1's latent means (chosen on MNIST with 100 labels, one seed; README): a
# Gaussian per feature, a KL weight of 1 (the tables' 4 left q(y|x) to drift, 81 % to 70 % over 30 epochs)
# and the paper's single hidden layer of 500.
STACKED_DEFAULTS: dict[str, Any] = {"epochs": 50, "trim": 0.0, "refit": 0.0, "beta": 1.0, "per_feature_logvar": True,
                                    "hidden": (500,), "latent_dim": 16, "lr_schedule": "cosine"}


def default_batch_size(train_rows: int) -> int:
    """DEFAULT_BATCH_SIZE, or for a small data set one that gives MIN_STEPS_PER_EPOCH steps per epoch."""
    return max(1, min(DEFAULT_BATCH_SIZE, math.ceil(train_rows / MIN_STEPS_PER_EPOCH)))


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default once: not when its help already says it ("[default: ...]"), when it is
    None (the help says what happens instead), or for an on/off switch."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "[default" in text or action.default in (None, False, argparse.SUPPRESS) or not action.option_strings:
            return text
        return super()._get_help_string(action) or text


def default_name(args: argparse.Namespace) -> str:
    """A name for a model trained without --name: the data file's stem, else the dataset (+ -conditional)."""
    path = Path(args.data) if args.data else None
    if path is not None and not path.is_dir():
        base = re.sub(r"[^A-Za-z0-9_.-]+", "-", path.stem).lstrip("_.-")[:56]
        if base:
            return base
    return args.dataset + ("-semi-supervised" if args.semi_supervised else "-conditional" if args.conditional else "")


def _hidden(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(s) for s in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not sizes or any(s < 1 for s in sizes):
        raise argparse.ArgumentTypeError(f"hidden sizes must be positive integers, got {text!r}")
    return sizes


def _positive(kind: Callable[[str], float], zero: bool = False) -> Callable[[str], Any]:
    """An argparse type: a number above 0 (or, with `zero`, at least 0)."""
    def parse(text: str) -> Any:
        value = kind(text)
        if value < 0 or (value == 0 and not zero):
            raise argparse.ArgumentTypeError(f"must be {'>=' if zero else '>'} 0, got {text}")
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
        formatter_class=HelpFormatter,
    )
    d = p.add_argument_group("data")
    d.add_argument("--dataset", choices=DATASETS, default="digits",
                   help="digits: scikit-learn's embedded 8x8 digits; mnist: IDX files or .npz; csv/npy: your table "
                   "(csv: a .csv, or a .parquet by its suffix)")
    d.add_argument("--data", metavar="PATH", help="file or folder for mnist, csv and npy")
    d.add_argument("--label-column", help="CSV column kept out of the features (the labels of --conditional)")
    d.add_argument("--labels", metavar="FILE", help="labels for an .npy table: .npy, or text with one per line")
    d.add_argument("--id-column", help="CSV column of row ids, left out of the features")
    d.add_argument("--ignore-columns", type=column_list, default=(), metavar="A,B",
                   help="comma-separated CSV columns left out of the features (strings, timestamps, ...)")
    d.add_argument("--no-header", dest="header", action="store_false",
                   help="the CSV's first row is data: columns are c0, c1, ... and scored by position")
    d.add_argument("--conditional", action="store_true",
                   help="a conditional VAE: encoder and decoder see the label (digits and mnist use their own "
                        "labels; csv/npy take --label-column / --labels); the service then takes `label`")
    d.add_argument("--semi-supervised", action="store_true",
                   help="a semi-supervised VAE (M2): a conditional VAE whose label is a latent variable where it "
                        "is not given, with a classifier q(y|x); rows whose label is empty, NaN or -1 are "
                        "unlabelled. The service then answers /classify and takes `label` optionally")
    d.add_argument("--labelled-per-class", type=_positive(int), metavar="N",
                   help="with --semi-supervised: keep N labels per class among the training rows and hide the "
                        "rest (validation labels only measure the accuracy printed per epoch)")
    d.add_argument("--stack-on", type=Path, metavar="MODEL_DIR",
                   help="with --semi-supervised: M1+M2 (Kingma et al. 2014): train M2 on the latent means of this "
                        "unconditional model folder (M1, trained on the same kind of rows without labels) and export "
                        "the two as one model of the rows; the model and training flags then set M2 "
                        "[default M2: hidden 500, latent 16, beta 1, 50 epochs, cosine]")
    d.add_argument("--binarize", choices=("none", "dynamic"), default="none",
                   help="dynamic: train on x ~ Bernoulli(grey level), drawn anew every epoch (Bernoulli images)")
    d.add_argument("--val-fraction", type=float, default=0.15,
                   help="share of rows held out for validation (digits, csv, npy; MNIST uses its test set)")
    m = p.add_argument_group("model")
    m.add_argument("--arch", choices=("mlp", "conv"), default="mlp",
                   help="mlp: fully connected layers (--hidden widths); conv: convolutions (--hidden channels), "
                        "for image datasets")
    m.add_argument("--latent-dim", type=_positive(int),
                   help="[default: 8 for images (semi-supervised: 4), 16 for csv/npy]")
    m.add_argument("--hidden", type=_hidden,
                   help="MLP layer widths, or conv channel counts, comma-separated (e.g. 400 or 32,64) "
                        "[default: 128 for images (semi-supervised: 512), 128,64 for csv/npy]")
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
    t.add_argument("--epochs", type=_positive(int),
                   help="[default: 30 for images (semi-supervised: 200), 20 for csv/npy]")
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
    t.add_argument("--lr", type=_positive(float), default=1e-3, help="Adam's learning rate")
    t.add_argument("--lr-schedule", choices=("constant", "cosine"),
                   help="cosine: decay the learning rate to lr/100 by the last epoch [default: constant; "
                        "semi-supervised images: cosine]")
    t.add_argument("--beta", type=float, help="weight of the KL term [default: 1 for images, 4 for csv/npy]")
    t.add_argument("--warmup-epochs", type=int, default=0, help="anneal beta from 0 over this many epochs")
    t.add_argument("--classify-weight", type=_positive(float), default=TrainConfig.classify_weight,
                   help="semi-supervised: weight of the labelled rows' mean cross-entropy beside the per-row "
                        "negative ELBO")
    t.add_argument("--vat-weight", type=_positive(float, zero=True), default=None,
                   help="semi-supervised: weight of virtual adversarial training's smoothness term for the "
                        "classifier (0: plain M2) [default: 1 for images, 0 for csv/npy and --stack-on]")
    t.add_argument("--vat-rms", type=_positive(float), default=TrainConfig.vat_rms,
                   help="semi-supervised: size of that term's perturbation, as a root-mean-square per input "
                        "feature after preprocessing")
    t.add_argument("--seed", type=int, default=0, help="seeds the split, the initialisation and the noise")
    t.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="where to train; auto: CUDA when there is a GPU (the export runs on the CPU either way)")
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


def left_out(args: argparse.Namespace) -> tuple[str, ...]:
    """The CSV columns kept out of the features besides the label: the id column and --ignore-columns."""
    return tuple(c for c in (getattr(args, "id_column", None), *getattr(args, "ignore_columns", ())) if c)


def run_training(args: argparse.Namespace, argv: list[str]) -> Path:
    from training.export import export_model
    from training.train import resolve_device, train, without_worst

    likelihood = args.likelihood or ("bernoulli" if args.dataset in IMAGE_DATASETS else "gaussian")
    data = load_dataset(args.dataset, args.data, likelihood=likelihood, seed=args.seed,
                        val_fraction=args.val_fraction, label_column=args.label_column,
                        min_rows=args.batch_size or 1, labels=args.labels, drop=left_out(args), header=args.header)
    if args.conditional or args.semi_supervised:
        data.with_classes(args.semi_supervised, args.labelled_per_class, args.seed)
    elif args.labelled_per_class is not None:
        raise DataError("--labelled-per-class hides labels for a semi-supervised model; add --semi-supervised")
    if args.vat_weight and not args.semi_supervised:
        raise DataError("--vat-weight smooths a semi-supervised model's classifier; add --semi-supervised")
    stack = None
    if args.stack_on is not None:
        from training.stack import stack_on

        if not args.semi_supervised:
            raise DataError("--stack-on trains the M2 of M1+M2, a semi-supervised model; add --semi-supervised")
        if args.arch != "mlp" or args.binarize != "none" or args.likelihood == "bernoulli":
            raise DataError("with --stack-on, M2 models M1's latent means: an MLP with a Gaussian decoder "
                            "(leave out --arch, --binarize and --likelihood; M1 keeps its own)")
        likelihood = "gaussian"
        stack = stack_on(args.stack_on, data)
        m1 = stack.record
        print(f"M1+M2: M2 over the {stack.latents.input_dim} active latent units (of {m1['latent_dim']}) of "
              f"{m1['name']} v{m1['version']}")
        data = stack.latents
    if args.semi_supervised and (args.trim or args.refit):
        raise DataError("--trim and --refit leave out rows a model fits worst; a semi-supervised model learns "
                        "from every row (leave both out)")
    if args.binarize == "dynamic" and likelihood != "bernoulli":
        raise DataError("--binarize dynamic draws Bernoulli pixels; it needs --likelihood bernoulli")
    if args.dense and args.arch != "conv":
        raise DataError("--dense adds a layer to the conv architecture; an MLP's layers are --hidden")
    input_shape = data.input_shape  # kept even for an MLP, so callers may send shaped rows
    if args.arch == "conv" and len(data.input_shape) != 3:
        raise DataError(f"--arch conv needs image data; {args.dataset} rows are flat {list(data.input_shape)}")
    defaults = STACKED_DEFAULTS if stack else TABLE_DEFAULTS if args.dataset not in IMAGE_DATASETS else (
        SEMI_SUPERVISED_IMAGE_DEFAULTS if args.semi_supervised else IMAGE_DEFAULTS)
    args.hidden = args.hidden or defaults["hidden"]
    args.latent_dim = args.latent_dim or defaults["latent_dim"]
    per_feature = defaults["per_feature_logvar"] if args.per_feature_logvar is None else args.per_feature_logvar
    model_cfg = ModelConfig(
        input_shape=input_shape, latent_dim=args.latent_dim, hidden=args.hidden, arch=args.arch,
        likelihood=likelihood,  # type: ignore[arg-type]  # argparse choices guarantee the literal
        learn_logvar=args.fixed_logvar is None,
        decoder_logvar=args.fixed_logvar if args.fixed_logvar is not None else 0.0,
        per_feature_logvar=bool(per_feature) and likelihood == "gaussian",
        dense=max(0, args.dense), num_classes=len(data.classes or ()), semi_supervised=args.semi_supervised,
    )
    trim = 0.0 if args.semi_supervised else float(defaults["trim"] if args.trim is None else args.trim)
    refit = 0.0 if args.semi_supervised else float(defaults["refit"] if args.refit is None else args.refit)
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
                      val_fraction=args.val_fraction, binarize=args.binarize,
                      lr_schedule=args.lr_schedule or defaults.get("lr_schedule", "constant"),
                      classify_weight=args.classify_weight,
                      vat_weight=float(defaults.get("vat_weight", 0.0) if args.vat_weight is None else args.vat_weight),
                      vat_rms=args.vat_rms)
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
                 "semi_supervised": args.semi_supervised, "labelled_per_class": args.labelled_per_class,
                 "left_out": list(left_out(args)), "header": args.header,
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
    if best.val_accuracy is not None:
        metrics["val_accuracy"] = best.val_accuracy
    model = result.model
    if stack:
        model, data, metrics = _stacked(result.model, stack, metrics)
        training["stacked_on"] = stack.record
        training["history_of"] = "M2, over M1's latent means (nats of those features)"
    folder, manifest = export_model(model, data, name=name, output=args.output, training=training,
                                    metrics=metrics, sign=args.sign, new_model=args.name is None,
                                    report=lambda line: print(line, flush=True))
    worst = max(c.max_abs_diff for c in manifest.parity)
    print(f"best epoch {result.best_epoch}: validation -ELBO {metrics['val_neg_elbo']:.3f} nats; "
          f"training took {result.train_seconds:.1f}s")
    if folder.parent.name != name:
        print(f"{args.output / name} exists, so this model is {folder.parent.name}, a model of its own "
              f"(pass --name {name} to add a version to {name} instead)")
    default = manifest.calibration_for(manifest.default_score) or manifest.calibration
    print(f"exported {folder} (TorchScript and ONNX match eager within {worst:.1e}; "
          f"default anomaly score {manifest.default_score}, threshold {default.threshold:.2f} nats at the "
          f"{default.threshold_level:.0%} quantile)")
    return folder


def _stacked(m2: VAE, stack: Stack, m2_metrics: dict[str, float]) -> tuple[VAE, Dataset, dict[str, float]]:
    """The M1+M2 stack as one model of the rows, the rows' dataset, and the stack's own validation figures
    (its label-marginal bound on the rows; M2's, over the features, kept as m2_*)."""
    from training.train import accuracy, evaluate_elbo

    rows = stack.rows
    model = stack.model(m2.cpu().eval()).eval()
    x_val = torch.from_numpy(rows.preprocessing.apply(rows.x_val))
    e = evaluate_elbo(model, x_val)
    metrics = {"val_neg_elbo": e["loss"], "val_reconstruction": e["reconstruction"], "val_kl": e["kl"],
               **{f"m2_{k}": v for k, v in m2_metrics.items() if k != "val_accuracy"}}
    if rows.label_index_val is not None:
        got = accuracy(model, x_val, torch.from_numpy(rows.label_index_val))
        if got is not None:
            metrics["val_accuracy"] = got
    return model, rows, metrics


def train(argv: list[str]) -> Path:
    """`vae-train ARGS` as a function: the exported model folder; a DataError says what is wrong."""
    return run_training(train_parser().parse_args(argv), argv)
