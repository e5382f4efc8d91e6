"""`vae-bench`: throughput and latency of vaeserve under concurrent load, against baselines."""
