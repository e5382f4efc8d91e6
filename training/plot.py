"""`vae-train plot MODEL_DIR`: what a model has learned, as PNG files, drawn from its exported graphs.

Image models: a sample grid (conditional: one row per class), validation rows beside their
reconstructions, interpolation strips, and a latent traversal grid, all drawn by the service's own
picture code (so they look exactly as `Accept: image/png` answers do). Every model: a 2-D map of the
encoded validation set (the first two principal components of the latent means, coloured by label
where there are labels) and the training curves from the manifest, drawn with matplotlib.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from service.folder import open_graphs
from service.manifest import Manifest
from service.pictures import picture
from service.scoring import with_label
from training.evaluate import recorded_dataset

SAMPLES = 64
PAIRS = 16
STRIPS, STEPS = 4, 10
TRAVERSED_DIMS, TRAVERSAL_STEPS, TRAVERSAL_RANGE = 8, 9, 3.0
MAP_ROWS = 5000


class Drawer:
    """The exported ONNX graphs of one model, in the caller's data space."""

    def __init__(self, folder: Path):
        self.m, self.encoder, self.decoder = open_graphs(folder)
        self.shift, self.scale = self.m.preprocessing.arrays()

    def _label(self, labels: np.ndarray | None, n: int) -> np.ndarray | None:
        """Class indices for a conditional model (class 0 where none are given); None otherwise."""
        if not self.m.classes:
            return None
        return np.zeros(n, dtype=np.int64) if labels is None else labels

    def encode(self, x: np.ndarray, labels: np.ndarray | None = None) -> np.ndarray:
        xm = ((x - self.shift) / self.scale).astype(np.float32)
        return self.encoder(with_label(xm, self._label(labels, len(x)), self.m.num_classes))[0]

    def decode(self, z: np.ndarray, labels: np.ndarray | None = None) -> np.ndarray:
        (out,) = self.decoder(with_label(z.astype(np.float32), self._label(labels, len(z)), self.m.num_classes))
        return out * self.scale + self.shift

    def png(self, rows: np.ndarray, **kwargs: Any) -> bytes:
        low = np.broadcast_to(self.shift, (self.m.input_dim,))
        return picture(rows, tuple(self.m.input_shape), low, low + np.broadcast_to(self.scale, low.shape), **kwargs)


def _class_indices(manifest: Manifest, y: np.ndarray | None) -> np.ndarray | None:
    if y is None or not manifest.classes:
        return None
    index = {c: i for i, c in enumerate(manifest.classes)}
    return np.array([index[str(v)] for v in y], dtype=np.int64)


def image_plots(d: Drawer, x_val: np.ndarray, y_val: np.ndarray | None, seed: int) -> dict[str, bytes]:
    rng = np.random.default_rng(seed)
    m = d.m
    out: dict[str, bytes] = {}
    if m.classes:  # one row per class, the same latents in every row
        per_row = 10
        z = np.tile(rng.standard_normal((per_row, m.latent_dim)), (m.num_classes, 1))
        labels = np.repeat(np.arange(m.num_classes), per_row)
        out["samples.png"] = d.png(d.decode(z, labels), columns=per_row)
    else:
        out["samples.png"] = d.png(d.decode(rng.standard_normal((SAMPLES, m.latent_dim))))
    pick = rng.choice(len(x_val), size=min(PAIRS, len(x_val)), replace=False)
    picked = None if y_val is None else y_val[pick]
    out["reconstructions.png"] = d.png(d.decode(d.encode(x_val[pick], picked), picked), pairs=x_val[pick], columns=4)
    strips = []
    for _ in range(STRIPS):
        a, b = rng.choice(len(x_val), size=2, replace=False)
        label = None if y_val is None else np.full(2, y_val[a])
        ends = d.encode(x_val[[a, b]], label)
        t = np.linspace(0, 1, STEPS)[:, None]
        strips.append(d.decode((1 - t) * ends[0] + t * ends[1], None if label is None else np.full(STEPS, label[0])))
    out["interpolation.png"] = d.png(np.concatenate(strips), columns=STEPS)
    # Traverse the dimensions the encoder uses most (largest spread of the validation means), one row each.
    means = d.encode(x_val, y_val)
    dims = np.argsort(-means.std(axis=0))[: min(TRAVERSED_DIMS, m.latent_dim)]
    values = np.linspace(-TRAVERSAL_RANGE, TRAVERSAL_RANGE, TRAVERSAL_STEPS)
    z = np.zeros((len(dims) * TRAVERSAL_STEPS, m.latent_dim))
    for row, dim in enumerate(dims):
        z[row * TRAVERSAL_STEPS : (row + 1) * TRAVERSAL_STEPS, dim] = values
    out["traversal.png"] = d.png(d.decode(z), columns=TRAVERSAL_STEPS)
    return out


def _figure_png(fig: Any) -> bytes:
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return buffer.getvalue()


def chart_plots(d: Drawer, x_val: np.ndarray, y_val: np.ndarray | None, y_names: np.ndarray | None,
                seed: int) -> dict[str, bytes]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError("the latent map and training curves need matplotlib: pip install 'vaeserve[plot]'") from None
    out: dict[str, bytes] = {}
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(x_val), size=min(MAP_ROWS, len(x_val)), replace=False)
    means = d.encode(x_val[pick], None if y_val is None else y_val[pick])
    centred = means - means.mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    xy = centred @ vt[:2].T if vt.shape[0] >= 2 else np.column_stack([centred[:, 0], np.zeros(len(centred))])
    fig, ax = plt.subplots(figsize=(6, 5))
    if y_names is not None:
        names = y_names[pick].astype(str)
        classes = sorted(set(names), key=lambda v: (len(v), v))
        cmap = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20")
        for i, c in enumerate(classes):
            mask = names == c
            ax.scatter(xy[mask, 0], xy[mask, 1], s=4, color=cmap(i % cmap.N), label=c, alpha=0.7)
        ax.legend(markerscale=3, fontsize=8, title="label", loc="best")
    else:
        ax.scatter(xy[:, 0], xy[:, 1], s=4, alpha=0.6)
    ax.set_xlabel("latent PC 1")
    ax.set_ylabel("latent PC 2")
    ax.set_title(f"{d.m.name} v{d.m.version}: validation latent means")
    out["latent_map.png"] = _figure_png(fig)
    plt.close(fig)
    history = d.m.training.get("history") or []
    if history:
        epochs = [h["epoch"] for h in history]
        fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
        left.plot(epochs, [h["train_loss"] for h in history], label="train -ELBO (beta-weighted)")
        left.plot(epochs, [h["val_loss"] for h in history], label="validation -ELBO")
        left.set_xlabel("epoch")
        left.set_ylabel("nats per example")
        losses = [h["val_loss"] for h in history]
        low, high = min(losses), np.percentile(losses, 90)
        left.set_ylim(low - 0.05 * (high - low + 1), high + 0.2 * (high - low + 1))
        left.legend()
        right.plot(epochs, [h["val_reconstruction"] for h in history], label="validation reconstruction")
        right.plot(epochs, [h["val_kl"] for h in history], label="validation KL")
        right.set_xlabel("epoch")
        right.legend()
        fig.suptitle(f"{d.m.name} v{d.m.version}: training curves")
        out["curves.png"] = _figure_png(fig)
        plt.close(fig)
    return out


def plot(model_dir: Path, out: Path, *, dataset: str | None = None, data: str | None = None,
         seed: int = 0) -> list[Path]:
    """Write the model's pictures into `out`; returns the files written."""
    d = Drawer(model_dir)
    manifest = d.m
    ds = recorded_dataset(manifest, dataset, data)
    y_val = _class_indices(manifest, ds.y_val)
    pictures: dict[str, bytes] = {}
    if len(manifest.input_shape) == 3 and manifest.input_shape[0] in (1, 3):
        pictures.update(image_plots(d, ds.x_val, y_val, seed))
    pictures.update(chart_plots(d, ds.x_val, y_val, ds.y_val, seed))
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, body in pictures.items():
        (out / name).write_bytes(body)
        written.append(out / name)
    return written
