"""`vae-train`: train a VAE and export it; `vae-train evaluate`: score an exported model."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

import numpy as np

from training.data import DATASETS, DataError, column_list
from training.run import HelpFormatter, _positive, left_out, run_training, train_parser


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
                                formatter_class=HelpFormatter)
    p.add_argument("model", type=Path, help=model_help)
    p.add_argument("--dataset", choices=DATASETS, help="[default: the one recorded in the manifest]")
    p.add_argument("--data", metavar="PATH", help="[default: the path recorded in the manifest]")
    return p


def evaluate_parser() -> argparse.ArgumentParser:
    p = _model_command("vae-train evaluate", "Negative ELBO and importance-weighted -log p(x), nats per example, of "
                       "a dataset split, computed with an exported model's graphs.")
    p.add_argument("--split", choices=("train", "val", "test"), default="val",
                   help="which rows of the model's recorded dataset to score (test: MNIST's test set; the "
                        "validation rows elsewhere)")
    p.add_argument("--samples", type=_positive(int), default=1000, help="K for the importance-weighted estimate")
    p.add_argument("--runtime", choices=("onnx", "torchscript"), default="onnx",
                   help="which exported graphs to run (both give the same numbers within the parity tolerance)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    a = p.add_argument_group("anomaly detection (labelled rows: --data FILE with labels)")
    a.add_argument("--label-column", help="CSV column of labels, 0 = normal, 1 = anomaly")
    a.add_argument("--labels", type=Path, metavar="FILE", help="labels (.npy of 0/1) for an .npy --data file")
    a.add_argument("--id-column", help="CSV column of row ids, left out of the features")
    a.add_argument("--ignore-columns", type=column_list, default=(), metavar="A,B",
                   help="comma-separated CSV columns left out of the features")
    a.add_argument("--no-header", dest="header", action="store_false",
                   help="the CSV's first row is data: its columns are taken by position")
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
    p.add_argument("--seed", type=int, default=0, help="seeds the judge and the samples drawn")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p


def benchmark_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vae-train benchmark-anomaly",
        description="ADBench's protocol on every *.npz (X, y) in a folder: per seed a set over 10,000 rows "
                    "subsampled to 10,000 and a 70/30 split stratified on y, a VAE trained with the defaults on the "
                    "training split (labels unused), the test rows scored as the service scores them, and "
                    "IsolationForest, ECOD and KNN (PyOD) on the same split. Writes JSON, markdown and a PNG.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--data", type=Path, required=True, help="folder of .npz files holding X and y, and/or "
                   ".parquet tables with a label column y")
    p.add_argument("--seeds", default="1,2,3", help="comma-separated split and training seeds")
    p.add_argument("--sets", help="comma-separated file names without .npz, e.g. 6_cardio,38_thyroid [default: all]")
    p.add_argument("--jobs", type=_positive(int), default=max(1, min(os.cpu_count() or 1, 8)),
                   help="worker processes running (set, seed) pairs side by side; 1 runs them in this process "
                   "[default: this machine's CPU count, at most 8]")
    p.add_argument("--out", type=Path, default=Path("bench/results"), help="where the JSON and markdown go")
    p.add_argument("--train-args", default="", help="extra vae-train flags for an ablation, e.g. '--epochs 10'")
    p.add_argument("--score", choices=("elbo", "iwae"),
                   help="the score to measure [default: elbo, or iwae when --samples > 1, as the service chooses]")
    p.add_argument("--samples", type=_positive(int), help="K samples for the score [default: the calibration's K]")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
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
                                  drop=left_out(args), header=args.header,
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
