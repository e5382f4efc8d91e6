"""The training loop: Adam on the negative ELBO with KL warm-up, best epoch kept, resumable."""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from training.config import ModelConfig, TrainConfig
from training.data import Dataset
from training.losses import virtual_adversarial_kl
from training.model import ELBO, VAE


@dataclass
class EpochStats:
    epoch: int  # 1-based
    beta: float
    train_loss: float  # negative ELBO (beta-weighted), nats per example
    val_loss: float  # negative ELBO with beta = 1, nats per example
    val_reconstruction: float
    val_kl: float
    seconds: float
    # Semi-supervised runs: the labelled and unlabelled rows' mean loss terms, and q(y|x)'s accuracy on the
    # validation rows that have labels (None when none do). Their val_loss is the label-marginal bound.
    labelled_loss: float | None = None
    unlabelled_loss: float | None = None
    val_accuracy: float | None = None


@dataclass
class TrainResult:
    model: VAE
    history: list[EpochStats]
    best_epoch: int
    best_val_loss: float
    train_seconds: float


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but torch sees no CUDA GPU")
    return torch.device(device)


@torch.no_grad()
def elbo_rows(model: VAE, x: torch.Tensor, seed: int = 0, y: torch.Tensor | None = None,
              batch_size: int = 1024) -> ELBO:
    """Each row's negative ELBO (beta = 1) and its terms, nats, one seeded sample per row."""
    model.eval()
    gen = torch.Generator(device=x.device).manual_seed(seed)
    parts = [model.elbo(x[i : i + batch_size], beta=1.0, generator=gen, y=None if y is None else y[i : i + batch_size])
             for i in range(0, len(x), batch_size)]
    return ELBO(*(torch.cat([getattr(p, term) for p in parts]) for term in ("loss", "reconstruction", "kl")))


@torch.no_grad()
def unlabelled_rows(model: VAE, x: torch.Tensor, seed: int = 0, batch_size: int = 256) -> ELBO:
    """A semi-supervised model's label-marginal bound per row, and its terms (`VAE.unlabelled_loss`)."""
    model.eval()
    gen = torch.Generator(device=x.device).manual_seed(seed)
    parts = [model.unlabelled_loss(x[i : i + batch_size], generator=gen) for i in range(0, len(x), batch_size)]
    return ELBO(*(torch.cat([getattr(p, term) for p in parts]) for term in ("loss", "reconstruction", "kl")))


@torch.no_grad()
def accuracy(model: VAE, x: torch.Tensor, y: torch.Tensor) -> float | None:
    """q(y|x)'s accuracy on the rows with labels (y >= 0); None when none has one."""
    known = y >= 0
    if not bool(known.any()):
        return None
    model.eval()
    return (model.classifier(x[known]).argmax(dim=1) == y[known]).double().mean().item()


def evaluate_elbo(model: VAE, x: torch.Tensor, batch_size: int = 1024, seed: int = 0,
                  y: torch.Tensor | None = None) -> dict[str, float]:
    """Mean negative ELBO (beta = 1) and its terms over rows x, nats per example; noise seeded. A
    semi-supervised model's is the label-marginal bound: validation labels are not read."""
    e = unlabelled_rows(model, x, seed) if model.cfg.semi_supervised else elbo_rows(model, x, seed, y, batch_size)
    return {"loss": e.loss.double().mean().item(), "reconstruction": e.reconstruction.double().mean().item(),
            "kl": e.kl.double().mean().item()}


def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def train(data: Dataset, model_cfg: ModelConfig, cfg: TrainConfig, *, device: torch.device,
          checkpoint: Path | None = None, resume: bool = False, progress: bool = True) -> TrainResult:
    """Train on data.x_train, validate on data.x_val after every epoch, keep the best epoch (a
    semi-supervised model: the last)."""
    torch.manual_seed(cfg.seed)
    model = VAE(model_cfg).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    x_train = torch.from_numpy(data.preprocessing.apply(data.x_train)).to(device)
    x_val = torch.from_numpy(data.preprocessing.apply(data.x_val)).to(device)
    if cfg.binarize == "dynamic":  # validation rows are binarised once, with a fixed seed, like a test set
        x_val = torch.bernoulli(x_val.clamp(0, 1), generator=torch.Generator(device=device).manual_seed(cfg.seed))
    y_train = y_val = None
    if model_cfg.conditional:
        if data.label_index_train is None or data.label_index_val is None:
            raise ValueError("a conditional VAE needs labelled data")
        y_train = torch.from_numpy(data.label_index_train).to(device)
        y_val = torch.from_numpy(data.label_index_val).to(device)
    history: list[EpochStats] = []
    best_state = copy.deepcopy(model.state_dict())
    best_val, best_epoch, start_epoch, elapsed = float("inf"), 0, 0, 0.0

    if resume and checkpoint is not None and checkpoint.exists():
        state = torch.load(checkpoint, map_location=device, weights_only=True)
        if ModelConfig.from_dict(state["model_config"]) != model_cfg:
            raise ValueError(f"{checkpoint} was written for another model: {state['model_config']}")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        best_state, best_val, best_epoch = state["best_model"], state["best_val"], state["best_epoch"]
        history = [EpochStats(**h) for h in state["history"]]
        start_epoch, elapsed = state["epoch"], state["seconds"]
        tqdm.write(f"resumed from {checkpoint} after epoch {start_epoch}")

    semi = model_cfg.semi_supervised
    # Semi-supervised: each step takes a batch of the unlabelled rows and one of the labelled rows, so the
    # few labels are seen every step (Kingma et al. 2014 draw the two kinds apart likewise).
    steps_over = torch.nonzero(y_train < 0).flatten() if semi and y_train is not None else None
    labelled_rows = torch.nonzero(y_train >= 0).flatten() if semi and y_train is not None else None
    if steps_over is not None and len(steps_over) == 0:
        steps_over = labelled_rows
    n = len(x_train) if steps_over is None else len(steps_over)
    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        beta = cfg.beta_at(epoch)
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr_at(epoch)
        # Shuffling and noise are seeded per epoch, so a resumed run repeats an uninterrupted one.
        gen = torch.Generator(device=device).manual_seed(cfg.seed * 100_003 + epoch)
        order = torch.randperm(n, generator=gen, device=device)
        if steps_over is not None:
            order = steps_over[order]
        n_batches = n // cfg.batch_size + (1 if n % cfg.batch_size else 0)
        model.train()
        total = 0.0
        terms = {"labelled": 0.0, "unlabelled": 0.0}
        bar = tqdm(range(n_batches), desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False,
                   disable=not progress or None, unit="batch")  # None: no bar off a terminal (logs, CI)
        for b in bar:
            rows = order[b * cfg.batch_size : (b + 1) * cfg.batch_size]
            xb = x_train[rows]
            if cfg.binarize == "dynamic":
                xb = torch.bernoulli(xb.clamp(0, 1), generator=gen)
            if semi:
                assert y_train is not None and labelled_rows is not None
                loss, parts = _semi_supervised_loss(model, x_train, y_train, xb, labelled_rows, b, cfg, beta, gen)
                for k, v in parts.items():
                    terms[k] += v * len(xb)
            else:
                losses = model.elbo(xb, beta=beta, generator=gen, y=None if y_train is None else y_train[rows]).loss
                if cfg.trim > 0:  # a trimmed mean: the rows the model fits worst (likely anomalies) do not pull it
                    keep = max(1, math.ceil(len(losses) * (1.0 - cfg.trim)))
                    losses = torch.topk(losses, keep, largest=False, sorted=False).values
                loss = losses.mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(xb)
            if b % 20 == 0:
                bar.set_postfix(loss=f"{loss.item():.2f}")
        val = evaluate_elbo(model, x_val, seed=cfg.seed, y=y_val)
        seconds = time.perf_counter() - t0
        elapsed += seconds
        stats = EpochStats(epoch + 1, beta, total / n, val["loss"], val["reconstruction"], val["kl"], seconds)
        if semi:
            assert y_val is not None
            stats = replace(stats, labelled_loss=terms["labelled"] / n, unlabelled_loss=terms["unlabelled"] / n,
                            val_accuracy=accuracy(model, x_val, y_val))
        history.append(stats)
        # A semi-supervised run keeps its last epoch: the label-marginal bound does not follow how well q(y|x)
        # classifies (on a table it can be best after one epoch, the classifier untrained), and choosing by
        # validation labels would spend labels an experiment hid.
        improved = semi or val["loss"] < best_val
        if improved:
            best_val, best_epoch = val["loss"], epoch + 1
            best_state = copy.deepcopy(model.state_dict())
        semi_line = "" if not semi else (
            f"  labelled {stats.labelled_loss:8.3f}  unlabelled {stats.unlabelled_loss:8.3f}"
            + ("" if stats.val_accuracy is None else f"  val accuracy {stats.val_accuracy:.1%}"))
        tqdm.write(f"epoch {epoch + 1:3d}/{cfg.epochs}  beta {beta:.3f}  train -ELBO {stats.train_loss:9.3f}  "
                   f"val -ELBO {stats.val_loss:9.3f} nats{semi_line}  ({seconds:.2f}s){'  *' if improved else ''}")
        if checkpoint is not None:
            _save_checkpoint(checkpoint, {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch + 1,
                "best_model": best_state, "best_val": best_val, "best_epoch": best_epoch,
                "history": [asdict(h) for h in history], "seconds": elapsed,
                "model_config": model_cfg.to_dict(),
            })
    model.load_state_dict(best_state)
    model.eval()
    return TrainResult(model=model, history=history, best_epoch=best_epoch, best_val_loss=best_val,
                       train_seconds=elapsed)


def _semi_supervised_loss(model: VAE, x_train: torch.Tensor, y_train: torch.Tensor, xb: torch.Tensor,
                          labelled_rows: torch.Tensor, step: int, cfg: TrainConfig, beta: float,
                          gen: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
    """One step's M2 objective, per training row: the labelled rows' -ELBO given their label and the
    unlabelled rows' label-marginal bound, each weighted by its share of the training rows, plus
    `classify_weight` times the labelled rows' mean -log q(y|x) (the term that trains the classifier on
    the labels; Hughes et al. 2018 show it needs a weight well above Kingma's 0.1 to classify well).
    `xb` is the step's rows (unlabelled, or labelled when every row is); the labelled batch
    cycles through the labelled rows, `cfg.batch_size` at a time. With `vat_weight`, q(y|x) is also kept
    from changing its answer within a small radius of the step's rows (virtual adversarial training): the
    unlabelled rows then teach the classifier directly, not only through the bound."""
    n_train, n_labelled = len(x_train), len(labelled_rows)
    size = min(cfg.batch_size, n_labelled)
    start = (step * size) % n_labelled
    pick = labelled_rows[(torch.arange(size, device=x_train.device) + start) % n_labelled]
    xl, yl = x_train[pick], y_train[pick]
    if cfg.binarize == "dynamic":
        xl = torch.bernoulli(xl.clamp(0, 1), generator=gen)
    labelled = model.elbo(xl, beta=beta, generator=gen, y=yl).loss.mean() + math.log(model.cfg.num_classes)
    cross_entropy = torch.nn.functional.cross_entropy(model.classifier(xl), yl)
    n_unlabelled = n_train - n_labelled
    unlabelled = model.unlabelled_loss(xb, beta, gen).loss.mean() if n_unlabelled else torch.zeros(())
    loss = (n_labelled * labelled + n_unlabelled * unlabelled) / n_train + cfg.classify_weight * cross_entropy
    if cfg.vat_weight:
        smoothness = virtual_adversarial_kl(model.classifier, xb, cfg.vat_radius(model.cfg.input_dim), gen).mean()
        loss = loss + cfg.vat_weight * smoothness
    return loss, {"labelled": labelled.item(), "unlabelled": unlabelled.item()}


def without_worst(model: VAE, data: Dataset, share: float, seed: int, device: torch.device) -> tuple[Dataset, dict]:
    """`data` less the `share` of its rows (training and validation alike, one cut-off) that `model` fits
    worst: training data for anomaly detection holds anomalies, and a first fit ranks most of them at the
    top. A table's scaling is fitted again on the rows kept, as a run on those rows alone would.
    Returns the data and what was left out."""
    def losses(x: np.ndarray, y: np.ndarray | None) -> np.ndarray:
        xt = torch.from_numpy(data.preprocessing.apply(x)).to(device)
        return elbo_rows(model, xt, seed, None if y is None else torch.from_numpy(y).to(device)).loss.cpu().numpy()

    train_loss = losses(data.x_train, data.label_index_train)
    val_loss = losses(data.x_val, data.label_index_val)
    cut = float(np.quantile(np.concatenate([train_loss, val_loss]), 1.0 - share))
    keep_train, keep_val = train_loss <= cut, val_loss <= cut

    def pick(a: np.ndarray | None, keep: np.ndarray) -> np.ndarray | None:
        return None if a is None else a[keep]

    kept = replace(
        data, x_train=data.x_train[keep_train], x_val=data.x_val[keep_val],
        y_train=pick(data.y_train, keep_train), y_val=pick(data.y_val, keep_val),
        label_index_train=pick(data.label_index_train, keep_train),
        label_index_val=pick(data.label_index_val, keep_val))
    kept.preprocessing = data.preprocessing.fitted_to(kept.x_train)
    return kept, {"share": share, "cut_off_nats": cut, "train_rows_left_out": int((~keep_train).sum()),
                  "val_rows_left_out": int((~keep_val).sum())}
