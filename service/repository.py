"""The model repository: every `<name>/<version>/` under VAE_MODEL_DIR, verified and loaded.

A version whose manifest fails the schema, whose files fail their sha256 (or, with
VAE_TRUSTED_KEYS, its signature), or whose graphs do not load is refused with a log line and a
metric; the rest are served. `reload()` looks again while serving: new versions are loaded off the
event loop and switched in only once loaded, so "latest" never names a half-loaded version; a
version whose folder disappears leaves the table at once, and requests already holding it finish
on it (its batchers live until the last of them lets go).
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import Executor
from dataclasses import dataclass, field
from functools import lru_cache, partial
from pathlib import Path

import numpy as np

from service.batching import Batcher
from service.codec import ascii_int
from service.drift import ScoreDrift
from service.errors import ModelNotFound, quoted
from service.folder import open_folder
from service.manifest import GRAPH_FILES, Manifest, ManifestError
from service.metrics import Metrics
from service.pools import Pools, run_in
from service.runtime import RUNTIMES, Graph, Runtime, cuda_available, load_graph
from service.scoring import common_noise
from service.settings import Settings
from service.signing import load_public_keys, verify_signature

log = logging.getLogger("vaeserve")


@dataclass
class LoadedModel:
    manifest: Manifest
    folder: Path
    runtime: Runtime
    device: str
    encoder: Batcher  # x [N, D] (model space) -> mean, logvar (semi-supervised: and q(y|x) [N, C])
    decoder: Batcher  # z [N, L] -> x_mean [N, D] (model space)
    runtime_timings: dict[str, float] = field(default_factory=dict)
    background: Executor | None = None  # large work off the event loop (service.pools); asyncio's pool if None
    drift: dict[str, ScoreDrift] = field(default_factory=dict)  # per score, against its calibration (at its K)

    def __post_init__(self) -> None:
        self.shift, self.scale = self.manifest.preprocessing.arrays()
        self.inv_scale = (1.0 / self.scale).astype(np.float32)
        self.identity = bool(np.all(self.shift == 0) and np.all(self.scale == 1))
        self.input_shape = tuple(self.manifest.input_shape)
        self.classes = self.manifest.classes or []
        self.num_classes = len(self.classes)
        self.class_index = {name: i for i, name in enumerate(self.classes)}
        self.semi_supervised = self.manifest.semi_supervised

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def version(self) -> int:
        return self.manifest.version

    @property
    def latent_dim(self) -> int:
        return self.manifest.latent_dim

    def to_model_space(self, x: np.ndarray) -> np.ndarray:
        """float32 [N, D], C-contiguous, a new array (the caller's may be a read-only view)."""
        if self.identity:
            return np.array(x, dtype=np.float32, order="C")
        out = np.subtract(x, self.shift, dtype=np.float32)  # beyond float32: inf, the most anomalous score
        out *= self.inv_scale
        return out

    def to_data_space(self, y: np.ndarray) -> np.ndarray:
        if self.identity:
            return y
        out = y * self.scale
        out += self.shift
        return out

    def data_range(self) -> tuple[np.ndarray, np.ndarray]:
        """The data space's range per feature, [shift, shift + scale] (pixels: 0..max), for pictures."""
        low = np.broadcast_to(self.shift, (self.manifest.input_dim,))
        return low, low + np.broadcast_to(self.scale, (self.manifest.input_dim,))

    def noise(self, samples: int) -> np.ndarray:
        """The fixed scoring noise for K samples (the calibration's seed): same row, same score."""
        return _noise(samples, self.latent_dim, self.manifest.calibration.seed)


@lru_cache(maxsize=64)
def _noise(samples: int, latent_dim: int, seed: int) -> np.ndarray:
    eps = common_noise(samples, latent_dim, seed)
    eps.setflags(write=False)
    return eps


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    return "cuda" if cuda_available() else "cpu"


def _time_graph(graph: Graph, width: int) -> float:
    """Seconds for one batch-1 call plus one batch-64 call (medians), to pick the faster runtime."""
    total = 0.0
    for batch, reps in ((1, 200), (64, 50)):
        x = np.random.default_rng(0).random((batch, width), dtype=np.float32)
        for _ in range(10):
            graph(x)
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            graph(x)
            times.append(time.perf_counter() - start)
        total += float(np.median(times))
    return total


def _check_graphs(manifest: Manifest, encoder: Graph, decoder: Graph) -> None:
    c = manifest.num_classes
    mean, logvar, *rest = encoder(np.zeros((2, manifest.input_dim + c), dtype=np.float32))
    (out,) = decoder(np.zeros((2, manifest.latent_dim + c), dtype=np.float32))
    if mean.shape != (2, manifest.latent_dim) or logvar.shape != mean.shape or out.shape != (2, manifest.input_dim):
        raise ManifestError(f"graphs return shapes {mean.shape}, {logvar.shape}, {out.shape}; the manifest says "
                            f"latent {manifest.latent_dim}, input {manifest.input_dim}")
    wanted = [(2, c)] if manifest.semi_supervised else []
    if [r.shape for r in rest] != wanted:
        says = f"semi-supervised: class probabilities {(2, c)}" if wanted else "no class probabilities"
        raise ManifestError(f"the encoder returns {2 + len(rest)} outputs, extra shapes {[r.shape for r in rest]}; "
                            f"the manifest says {says}")


Fingerprint = tuple[tuple[str, int, int], ...]


def fingerprint(folder: Path) -> Fingerprint:
    """Names, sizes and mtimes of a folder's files: a refused version is tried again once it changes."""
    try:
        return tuple(sorted((f.name, st.st_size, st.st_mtime_ns) for f in folder.iterdir()
                            if f.is_file() and (st := f.stat())))
    except OSError:
        return ()


@dataclass
class ReloadReport:
    loaded: list[str] = field(default_factory=list)
    unloaded: list[str] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)


class Repository:
    def __init__(self, settings: Settings, metrics: Metrics, pools: Pools | None):
        self.settings = settings
        self.metrics = metrics
        self.pools = pools
        self.device = resolve_device(settings.device)
        self.trusted = load_public_keys(settings.trusted_keys) if settings.trusted_keys else None
        self.models: dict[str, dict[int, LoadedModel]] = {}
        self.failures: dict[str, str] = {}
        self._refused_at: dict[str, Fingerprint] = {}
        self._lock = asyncio.Lock()

    @property
    def _background(self) -> Executor | None:
        return None if self.pools is None else self.pools.background

    def discover(self) -> dict[str, Path]:
        """Every `name/version` folder on disk ("." folders, such as exports in progress, are skipped)."""
        root = self.settings.model_dir
        if not root.is_dir():
            log.error("model repository %s does not exist", root)
            return {}
        found = {}
        for model_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            for version_dir in model_dir.iterdir():
                version = ascii_int(version_dir.name)
                if version is not None and version_dir.is_dir():
                    found[f"{model_dir.name}/{version}"] = version_dir
        return dict(sorted(found.items(), key=lambda kv: (kv[0].split("/")[0], int(kv[0].split("/")[1]))))

    def _pending(self, found: dict[str, Path]) -> dict[str, Path]:
        """Folders to try: not loaded, and not refused in the state they are in now."""
        loaded = {f"{name}/{v}" for name, versions in self.models.items() for v in versions}
        return {key: folder for key, folder in found.items()
                if key not in loaded and self._refused_at.get(key) != fingerprint(folder)}

    def _try_load(self, key: str, folder: Path) -> LoadedModel | None:
        """Load one version, or record why it is refused (once per state of its files)."""
        try:
            return self.load_version(folder)
        except Exception as e:  # noqa: BLE001 - one broken model must not stop the others
            name, version = key.split("/")
            self.failures[key] = str(e)
            self._refused_at[key] = fingerprint(folder)
            self.metrics.load_failures.labels(name, version).inc()
            log.error("refusing model %s: %s", key, e)
            return None

    def widest_row(self) -> int:
        """The most values one row (or latent) of any loaded model has: what bounds a legitimate body."""
        return max((max(m.manifest.input_dim, m.latent_dim) for versions in self.models.values()
                    for m in versions.values()), default=1)

    def _add(self, model: LoadedModel) -> None:
        key = f"{model.name}/{model.version}"
        self.failures.pop(key, None)
        self._refused_at.pop(key, None)
        # A new dict, swapped in whole: a reader never sees a half-updated table.
        self.models = {**self.models, model.name: {**self.models.get(model.name, {}), model.version: model}}
        self.metrics.model_info.labels(model.name, str(model.version), model.runtime, model.device).set(1)
        log.info("loaded model %s/%d (%s on %s)", model.name, model.version, model.runtime, model.device)

    def _remove(self, name: str, version: int) -> None:
        model = self.models[name][version]
        rest = {v: m for v, m in self.models[name].items() if v != version}
        self.models = {k: v for k, v in self.models.items() if k != name} | ({name: rest} if rest else {})
        self.metrics.model_info.remove(name, str(version), model.runtime, model.device)
        log.info("unloaded model %s/%d (its folder is gone); requests already on it finish", name, version)

    def load_all(self) -> None:
        """At start, in a worker thread: load everything on disk."""
        for key, folder in self._pending(self.discover()).items():
            model = self._try_load(key, folder)
            if model is not None:
                self._add(model)

    async def reload(self) -> ReloadReport:
        """Look at the disk again: load new versions (off the event loop), drop vanished ones.

        Runs one at a time; the table changes on the event loop, each version as soon as it loaded.
        """
        async with self._lock:
            report = ReloadReport()
            found = await run_in(self._background, self.discover)
            for name, versions in list(self.models.items()):
                for version in list(versions):
                    if f"{name}/{version}" not in found:
                        self._remove(name, version)
                        report.unloaded.append(f"{name}/{version}")
            for key in [k for k in self.failures if k not in found]:
                del self.failures[key]
                self._refused_at.pop(key, None)
            for key, folder in (await run_in(self._background, self._pending, found)).items():
                model = await run_in(self._background, self._try_load, key, folder)
                if model is None:
                    report.refused[key] = self.failures[key]
                else:
                    self._add(model)
                    report.loaded.append(key)
            return report

    def load_version(self, folder: Path) -> LoadedModel:
        s = self.settings
        candidates: tuple[Runtime, ...] = RUNTIMES if s.runtime == "auto" else (s.runtime,)
        check = partial(verify_signature, trusted=self.trusted) if self.trusted is not None else None
        verified = open_folder(folder, keep=[GRAPH_FILES[g, r] for r in candidates for g in ("encoder", "decoder")],
                               check_signature=check)
        manifest = verified.manifest
        if manifest.name != folder.parent.name or str(manifest.version) != folder.name:
            raise ManifestError(f"the manifest says {manifest.name}/{manifest.version} but lives in "
                                f"{folder.parent.name}/{folder.name}")
        loaded: dict[Runtime, tuple[Graph, Graph]] = {}
        errors = []
        for runtime in candidates:
            try:
                enc = load_graph(verified.blobs[GRAPH_FILES["encoder", runtime]], runtime, self.device, s.threads)
                dec = load_graph(verified.blobs[GRAPH_FILES["decoder", runtime]], runtime, self.device, s.threads)
                _check_graphs(manifest, enc, dec)
                loaded[runtime] = (enc, dec)
            except Exception as e:  # noqa: BLE001 - try the other runtime under auto
                errors.append(f"{runtime}: {e}")
        if not loaded:
            raise ManifestError("no runtime could load the graphs: " + "; ".join(errors))
        width = manifest.input_dim + manifest.num_classes
        timings = {r: _time_graph(g[0], width) for r, g in loaded.items()} if len(loaded) > 1 else {}
        runtime = min(timings, key=lambda r: timings[r]) if timings else next(iter(loaded))
        encoder_graph, decoder_graph = loaded[runtime]

        def batcher(graph: Graph, network: str) -> Batcher:
            return Batcher(graph, name=f"{manifest.name}/{manifest.version}/{network}",
                           max_batch_size=s.max_batch_size, max_delay_s=s.max_batch_delay_ms / 1000,
                           max_queue_rows=s.max_queue_rows,
                           executor=None if self.pools is None else self.pools.inference,
                           background=self._background,
                           metrics=self.metrics.network(manifest.name, manifest.version, network))

        return LoadedModel(manifest=manifest, folder=folder, runtime=runtime, device=self.device,
                           encoder=batcher(encoder_graph, "encoder"), decoder=batcher(decoder_graph, "decoder"),
                           runtime_timings={k: round(v * 1e6, 1) for k, v in timings.items()},
                           background=self._background,
                           drift={score: ScoreDrift(cal, s.drift_window_rows) for score, cal in
                                  {"elbo": manifest.calibration, **manifest.calibrations}.items()})

    def get(self, name: str | None, version: int | None) -> LoadedModel:
        name = name or self.settings.default_model
        versions = self.models.get(name)
        if not versions:
            known = ", ".join(sorted(self.models)) or "none"
            raise ModelNotFound(f"model {quoted(name)} is not loaded (loaded: {known})", field="model")
        if version is None:
            return versions[max(versions)]
        if version not in versions:
            raise ModelNotFound(f"model {quoted(name)} has no version {version} (versions: {sorted(versions)})",
                                field="version")
        return versions[version]

    @property
    def default_loaded(self) -> bool:
        return bool(self.models.get(self.settings.default_model))
