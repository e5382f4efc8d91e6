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


def evaluate_elbo(model: VAE, x: torch.Tensor, batch_size: int = 1024, seed: int = 0,
                  y: torch.Tensor | None = None) -> dict[str, float]:
    """Mean negative ELBO (beta = 1) and its terms over rows x, nats per example; noise seeded."""
    e = elbo_rows(model, x, seed, y, batch_size)
    return {"loss": e.loss.double().mean().item(), "reconstruction": e.reconstruction.double().mean().item(),
            "kl": e.kl.double().mean().item()}


def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def train(data: Dataset, model_cfg: ModelConfig, cfg: TrainConfig, *, device: torch.device,
          checkpoint: Path | None = None, resume: bool = False, progress: bool = True) -> TrainResult:
    """Train on data.x_train, validate on data.x_val after every epoch, keep the best epoch."""
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

    n = len(x_train)
    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        beta = cfg.beta_at(epoch)
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr_at(epoch)
        # Shuffling and noise are seeded per epoch, so a resumed run repeats an uninterrupted one.
        gen = torch.Generator(device=device).manual_seed(cfg.seed * 100_003 + epoch)
        order = torch.randperm(n, generator=gen, device=device)
        n_batches = n // cfg.batch_size + (1 if n % cfg.batch_size else 0)
        model.train()
        total = 0.0
        bar = tqdm(range(n_batches), desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False,
                   disable=not progress or None, unit="batch")  # None: no bar off a terminal (logs, CI)
        for b in bar:
            rows = order[b * cfg.batch_size : (b + 1) * cfg.batch_size]
            xb = x_train[rows]
            if cfg.binarize == "dynamic":
                xb = torch.bernoulli(xb.clamp(0, 1), generator=gen)
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
        history.append(stats)
        improved = val["loss"] < best_val
        if improved:
            best_val, best_epoch = val["loss"], epoch + 1
            best_state = copy.deepcopy(model.state_dict())
        tqdm.write(f"epoch {epoch + 1:3d}/{cfg.epochs}  beta {beta:.3f}  train -ELBO {stats.train_loss:9.3f}  "
                   f"val -ELBO {stats.val_loss:9.3f} nats  ({seconds:.2f}s){'  *' if improved else ''}")
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
