"""Scoring at pipeline scale: N generated rows x 20 features from Parquet to Parquet, `vae-score`
in-process and through a local service, and the Spark job on a local cluster of two workers: rows/s
and peak memory of each.

    python -m bench.scale [--rows 10000000] [--work DIR]

The table model is trained on 20,000 rows of the same generator (a linear mix of Gaussians, so the
features are correlated) with the table defaults; the scored file is written in row groups of
131,072 rows. Figures print as one markdown table.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.server import Server

FEATURES = 20
# The child's own peak: VmHWM starts afresh at exec, where ru_maxrss would carry this process's over.
SCORE = """import sys
from pathlib import Path
from training.score import main
rc = main(sys.argv[1:])
print("PEAK_KB", Path("/proc/self/status").read_text().split("VmHWM:")[1].split()[0])
sys.exit(rc)
"""


def generate(work: Path, rows: int) -> tuple[Path, Path]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    mix = rng.normal(size=(FEATURES, FEATURES)) / 4
    names = [f"f{j}" for j in range(FEATURES)]
    train = work / "train.csv"
    np.savetxt(train, rng.normal(size=(20_000, FEATURES)) @ mix, delimiter=",", header=",".join(names),
               comments="")
    path = work / "rows.parquet"
    writer = None
    for start in range(0, rows, 1_000_000):
        n = min(1_000_000, rows - start)
        x = (rng.normal(size=(n, FEATURES)) @ mix).astype(np.float32)
        table = pa.table({"id": pa.array(np.arange(start, start + n)), **{c: x[:, j] for j, c in enumerate(names)}})
        writer = writer or pq.ParquetWriter(path, table.schema)
        writer.write_table(table, row_group_size=131_072)
    assert writer is not None
    writer.close()
    return train, path


def score(args: list[str]) -> tuple[float, int]:
    """(rows/s, peak RSS in MB) of one vae-score process."""
    done = subprocess.run([sys.executable, "-c", SCORE, *args, "--no-progress"], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-2000:])
    rate = float(done.stderr.split(" rows/s")[0].rsplit("(", 1)[1].replace(",", ""))
    peak = int(done.stdout.split("PEAK_KB")[1].split()[0]) // 1024
    return rate, peak


def _tree_rss_kb(root: int) -> int:
    """Resident memory of a process and all its descendants now (Linux /proc), in kB."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            text = status.read_text()
        except OSError:
            continue
        pid = int(status.parent.name)
        children.setdefault(int(text.split("PPid:")[1].split()[0]), []).append(pid)
        rss[pid] = int(text.split("VmRSS:")[1].split()[0]) if "VmRSS:" in text else 0
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += rss.get(pid, 0)
        todo += children.get(pid, [])
    return total


def spark_job(rows: Path, model_dir: Path, out: Path) -> tuple[float, int]:
    """(rows/s, peak RSS of the job's whole process tree in MB: driver, JVM and Python workers, sampled
    every 0.2 s) of the example Spark job on local[2]."""
    import pyarrow.parquet as pq

    started = time.perf_counter()
    job = subprocess.Popen([sys.executable, "-m", "training.spark", str(rows), "--model-dir", str(model_dir),
                            "--keep", "id", "-o", str(out), "--master", "local[2]"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak = 0
    while job.poll() is None:
        peak = max(peak, _tree_rss_kb(job.pid))
        time.sleep(0.2)
    seconds = time.perf_counter() - started
    if job.returncode != 0:
        raise RuntimeError(job.stderr.read()[-2000:] if job.stderr else "the Spark job failed")
    return pq.ParquetDataset(out).read(columns=["score"]).num_rows / seconds, peak // 1024


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=10_000_000)
    p.add_argument("--work", type=Path, help="scratch folder [default: a temporary one]")
    p.add_argument("--no-spark", dest="spark", action="store_false", help="skip the Spark job (needs Java)")
    args = p.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="vae-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.time()
    train, rows = generate(work, args.rows)
    from training.cli import main as train_main

    assert train_main(["--dataset", "csv", "--data", str(train), "--output", str(work / "models"), "--name", "t20",
                       "--no-progress", "--checkpoint", str(work / "t20.pt")]) == 0
    local = score([str(rows), "--model-dir", str(work / "models" / "t20" / "1"), "--id-column", "id",
                   "-o", str(work / "local.parquet")])
    env = {"VAE_MAX_ROWS": "8192", "VAE_MAX_QUEUE_ROWS": "65536", "VAE_RELOAD_INTERVAL": "0"}
    with Server(model_dir=work / "models", default_model="t20", env=env) as server:
        remote = score([str(rows), "--url", server.url, "--id-column", "id", "-o", str(work / "remote.parquet")])
        assert server.proc is not None
        status = Path(f"/proc/{server.proc.pid}/status").read_text()
        server_peak = int(status.split("VmHWM:")[1].split()[0]) // 1024
    spark = spark_job(rows, work / "models" / "t20" / "1", work / "spark") if args.spark else None
    print(f"{args.rows:,} rows x {FEATURES} features, Parquet to Parquet, {os.cpu_count()} CPUs "
          f"({time.strftime('%Y-%m-%d %H:%M')}, {time.time() - started:.0f} s in all)\n")
    print("| vae-score | rows/s | peak RSS |\n|---|---|---|")
    print(f"| in-process (`--model-dir`) | {local[0]:,.0f} | {local[1]} MB |")
    print(f"| through a local service (`--url`, VAE_MAX_ROWS=8192) | {remote[0]:,.0f} | client {remote[1]} MB, "
          f"server {server_peak} MB |")
    if spark is not None:
        print(f"| Spark, local[2] (`python -m training.spark`, JVM start included) | {spark[0]:,.0f} | "
              f"{spark[1]} MB, the job's processes together |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
