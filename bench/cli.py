"""`vae-bench` / `make bench`: measure vaeserve and its baselines in one run, write JSON, markdown, PNG."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from tqdm import tqdm

from bench import peers as peer_servers
from bench import raw as raw_limit
from bench.grpc_load import run_grpc
from bench.load import LoadError, run_wrk, wrk_path
from bench.report import markdown, plot, targets
from bench.server import Server
from bench.workloads import (
    BATCHING_OFF,
    MNIST_NAME,
    WORKLOADS,
    Workload,
    digits_row,
    export_mnist_sized,
    mnist_like_row,
    request_headers,
    write_bodies,
)
from service.repository import resolve_device

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="vae-bench", description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="3 s cells, MNIST-sized model only, no peers (< 2 min)")
    p.add_argument("--duration", type=float, help="seconds per cell [default: 10, quick: 3]")
    p.add_argument("--warmup", type=float, help="seconds of warm-up per server [default: 3, quick: 1]")
    p.add_argument("--url", help="measure a service already running there (no batching-off baseline, no RSS)")
    p.add_argument("--no-peers", action="store_true", help="skip TorchServe, Triton and naive FastAPI")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results", help="where results go")
    return p.parse_args(argv)


def measure_cells(server: Server, w: Workload, body: Path, *, model: str, seconds: list[float]) -> list[dict]:
    """One cell per entry of `seconds`, each with its own batch-size delta."""
    out = []
    for duration in seconds:
        before = server.batch_totals(w.network, model)
        if w.path.startswith("grpc:"):
            assert server.grpc_address is not None, "measure_model skips the gRPC cells under --url"
            endpoint = f"grpc/{w.path.rsplit('.', 1)[1]}"
            refused = server.failed_requests(endpoint)
            result = run_grpc(server.grpc_address, body, connections=w.connections, seconds=duration,
                              rows_per_request=w.rows)
            # h2load sees HTTP 200 on a refused call (its status is in gRPC's trailers): the server counts
            # those, including the few in flight when h2load stopped, which h2load does not count at all.
            refused = int(server.failed_requests(endpoint) - refused)
            result = replace(result, errors=min(result.requests, result.errors + refused))
        else:
            result = run_wrk(f"{server.url}{w.path.format(model=model)}", body, connections=w.connections,
                             seconds=duration, rows_per_request=w.rows, content_type=w.content_type,
                             accept=w.accept, headers=request_headers(body.read_bytes()))
        after = server.batch_totals(w.network, model)
        out.append({"result": result, "rows": after[0] - before[0], "batches": after[1] - before[1]})
    return out


def combine(w: Workload, parts: list[dict], server: Server) -> dict[str, Any]:
    """Rates over the total time; latency percentiles as the median over the parts."""
    results = [p["result"] for p in parts]
    seconds = sum(r.seconds for r in results)
    good = sum(r.requests - r.errors for r in results)
    batches = sum(p["batches"] for p in parts)

    def median(values: list[float]) -> float:
        return sorted(values)[len(values) // 2]

    return {
        **asdict(w), "req_per_s": good / seconds, "rows_per_s": good * w.rows / seconds,
        "p50_ms": median([r.p50_ms for r in results]), "p95_ms": median([r.p95_ms for r in results]),
        "p99_ms": median([r.p99_ms for r in results]), "errors": sum(r.errors for r in results),
        "requests": sum(r.requests for r in results), "rounds": len(parts),
        "mean_batch": sum(p["rows"] for p in parts) / batches if batches else None, "rss_mb": server.rss_mb(),
    }


ROUNDS = 3


def measure_model(run: dict[str, Any], model: str, repo: Path, bodies: dict[str, Path], args: argparse.Namespace,
                  duration: float, warmup: float, log: Path, bar: tqdm) -> None:
    """Every workload on one model; with batching off too (a second server, up at the same time, so
    each on/off pair is measured back to back and the machine's drift cannot tell them apart)."""
    compare = model == MNIST_NAME and not args.url
    with contextlib.ExitStack() as stack:
        on = stack.enter_context(Server(model_dir=repo, default_model=model, url=args.url, log=log))
        off = stack.enter_context(Server(model_dir=repo, default_model=model, log=log,
                                         env={"VAE_MAX_BATCH_SIZE": "1"})) if compare else None
        refused = httpx.get(f"{on.url}/models", timeout=10).json().get("refused") or {}
        if refused and not args.url:  # a model the run measures later would be missing: stop now, say why
            raise RuntimeError(f"vaeserve refused models in the benchmark's repository: {refused}")
        run.setdefault("runtime", httpx.get(f"{on.url}/models/{model}", timeout=10).json().get("runtime"))
        for label, server in (("batching", on), ("no_batching", off)):
            if server is None:
                continue
            if server.proc is not None:
                run.setdefault("startup_s", {})[f"{label}/{model}"] = round(server.startup_s, 2)
            bar.set_description(f"{model}: warm-up")
            run_wrk(f"{server.url}/encode", bodies["row"], connections=16, seconds=warmup, rows_per_request=1)
        for w in WORKLOADS:
            body = bodies[w.body]
            if w.path.startswith("grpc:") and on.grpc_address is None:  # --url: its gRPC port is not known
                bar.update(1)
                continue
            if off is None or w not in BATCHING_OFF:
                bar.set_description(f"{model}: {w.label}")
                parts = measure_cells(on, w, body, model=model, seconds=[duration])
                run["service"].setdefault("batching", {}).setdefault(model, {})[w.label] = combine(w, parts, on)
                bar.update(1)
                continue
            # On and off alternate in short rounds: the comparison must not depend on which ran first.
            bar.set_description(f"{model}: {w.label}, batching on and off in alternation")
            rounds: dict[str, list[dict]] = {"batching": [], "no_batching": []}
            for _ in range(ROUNDS):
                for variant, server in (("batching", on), ("no_batching", off)):
                    rounds[variant] += measure_cells(server, w, body, model=model, seconds=[duration / ROUNDS])
            for variant, server in (("batching", on), ("no_batching", off)):
                run["service"].setdefault(variant, {}).setdefault(model, {})[w.label] = combine(w, rounds[variant],
                                                                                                 server)
            bar.update(2)


def neighbour_load(url: str, stop: threading.Event, counts: Counter[str]) -> None:
    """Heavy requests to the MNIST-sized model until `stop`, two at a time: iwae at the request limits
    (131 rows x 1,000 samples = VAE_MAX_DECODE_ROWS) and 1,024-image PNG grids (12.8 M pixels)."""
    rows = np.random.default_rng(0).random((131, 784)).round(3).tolist()
    json_body = {"content-type": "application/json"}
    # Bodies encoded once, as wrk sends its: the load generator shares the server's cores and must not
    # spend them re-encoding 100,000 numbers per request.
    heavy = [("/anomaly-score", json.dumps({"model": MNIST_NAME, "inputs": rows, "samples": 1000, "score": "iwae"}),
              json_body),
             ("/sample", json.dumps({"model": MNIST_NAME, "n": 1024, "upscale": 4, "columns": 32, "seed": 1}),
              {**json_body, "accept": "image/png"})]

    def loop(first: int) -> None:
        with httpx.Client(base_url=url, timeout=120) as client:
            k = first
            while not stop.is_set():
                path, body, headers = heavy[k % len(heavy)]
                counts[f"{path} {client.post(path, content=body, headers=headers).status_code}"] += 1
                k += 1

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def measure_neighbour(run: dict[str, Any], repo: Path, body: Path, duration: float, warmup: float,
                      log: Path) -> None:
    """Single-row /encode on the digits model at c=8, alone and while the MNIST-sized model serves heavy
    requests (`neighbour_load`), on one server, back to back."""
    with Server(model_dir=repo, default_model="digits", log=log) as server:
        run_wrk(f"{server.url}/encode", body, connections=8, seconds=warmup, rows_per_request=1)
        alone = run_wrk(f"{server.url}/encode", body, connections=8, seconds=duration, rows_per_request=1)
        stop, counts = threading.Event(), Counter[str]()
        load = threading.Thread(target=neighbour_load, args=(server.url, stop, counts))
        load.start()
        try:
            time.sleep(1.0)  # the heavy requests are running
            loaded = run_wrk(f"{server.url}/encode", body, connections=8, seconds=duration, rows_per_request=1)
        finally:
            stop.set()
            load.join()
        cells = {"alone": alone, "with_neighbour": loaded}
        run["neighbour"] = {name: {"req_per_s": r.req_per_s, "p50_ms": r.p50_ms, "p99_ms": r.p99_ms,
                                   "errors": r.errors, "requests": r.requests} for name, r in cells.items()}
        run["neighbour"]["p99_ratio"] = loaded.p99_ms / alone.p99_ms
        run["neighbour"]["heavy_requests"] = dict(counts)
        run["neighbour"]["rss_mb"] = server.rss_mb()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    duration = args.duration or (3.0 if args.quick else 10.0)
    warmup = args.warmup or (1.0 if args.quick else 3.0)
    try:
        wrk_path()
    except LoadError as e:
        print(f"vae-bench: {e}", file=sys.stderr)
        return 2
    started = time.strftime("%Y-%m-%d %H:%M")
    stamp = time.strftime("%Y-%m-%d_%H%M")
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="vae-bench-"))
    log = work / "bench.log"
    setup, why = (None, "--quick") if args.quick else (None, "--no-peers") if args.no_peers else peer_servers.find()
    models = [MNIST_NAME] if args.quick else [MNIST_NAME, "digits"]
    neighbour = not args.quick and not args.url
    steps = (len(WORKLOADS) * len(models) + (len(BATCHING_OFF) if not args.url else 0) + 2 + (1 if setup else 0)
             + neighbour)
    machine = f"{os.cpu_count()} CPUs, {platform.machine()}, Python {platform.python_version()}"
    run: dict[str, Any] = {"started": started, "machine": machine, "duration_s": duration, "warmup_s": warmup,
                           "service": {}, "raw": {}, "target_model": MNIST_NAME}
    with tqdm(total=steps, unit="step", disable=None,  # None: no bar when stderr is not a terminal
              bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}]") as bar:
        bar.set_description("exporting the MNIST-sized model")
        repo = work / "models"
        mnist_folder = export_mnist_sized(repo)
        (repo / "digits").mkdir(parents=True)
        shutil.copytree(REPO / "models" / "digits" / "1", repo / "digits" / "1")  # vaeserve serves no symlinks
        rows = {MNIST_NAME: mnist_like_row(), "digits": digits_row()}
        bar.set_description("raw in-process limit")
        device = resolve_device(os.environ.get("VAE_DEVICE", "auto"))  # the service's own choice
        run["device"] = device
        for model in models:
            folder = mnist_folder if model == MNIST_NAME else REPO / "models" / "digits" / "1"
            rates = raw_limit.rows_per_second(folder, len(rows[model]), device=device,
                                              window_s=0.1 if args.quick else 0.25)
            run["raw"][model] = {rt: {str(b): v for b, v in r.items()} for rt, r in rates.items()}
        bar.update(1)
        for model in models:
            bodies = write_bodies(work / model, rows[model], model)
            measure_model(run, model, repo, bodies, args, duration, warmup, log, bar)
        if neighbour:
            bar.set_description("digits encode beside heavy requests to the MNIST-sized model")
            measure_neighbour(run, repo, work / "digits" / "row.body", duration, warmup, log)
            bar.update(1)
        runtime = run.get("runtime", "onnx")
        for model, cells in run["service"]["batching"].items():
            limits: dict[int, float] = {int(b): v for b, v in run["raw"][model][runtime].items()}
            for c in cells.values():
                if c["mean_batch"] and c["path"] == "/encode":
                    c["raw_at_batch"] = raw_limit.at_batch(limits, c["mean_batch"])
                    c["raw_ratio"] = c["rows_per_s"] / c["raw_at_batch"]
        if "no_batching" in run["service"]:
            on, off = run["service"]["batching"][MNIST_NAME], run["service"]["no_batching"][MNIST_NAME]
            run["batching_ratios"] = {k: {"req_per_s": on[k]["req_per_s"] / off[k]["req_per_s"],
                                          "p50": on[k]["p50_ms"] / off[k]["p50_ms"]} for k in off}
        if setup is not None:
            bar.set_description("peers: naive FastAPI, TorchServe, Triton")
            try:
                run["peers"] = peer_servers.run(setup, duration=duration, warmup=warmup, out=work / "peers.json",
                                                log=log)
            except Exception as e:  # noqa: BLE001 - the service's figures still stand
                run["peers_note"] = f"the peer run failed: {e}"
            bar.update(1)
        else:
            run["peers_note"] = why
        run["targets"] = targets(run, MNIST_NAME)
        bar.set_description("writing the report")
        base = args.out / stamp
        base.with_suffix(".json").write_text(json.dumps(run, indent=1))
        report = markdown(run)
        base.with_suffix(".md").write_text(report)
        plot(run, base.with_suffix(".png"))
        bar.update(1)
    print(report)
    print(f"results: {base}.json, {base}.md, {base}.png (log: {log})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
