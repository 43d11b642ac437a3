"""Data pipeline throughput on the shapes default: one JSON line per worker count.

    .venv/bin/python benchmarks/data_pipeline.py [--seq_len 4096] [--batch_size 8]
        [--patches_per_image 64] [--workers 0 2] [--batches 40] [--warmup 5]

rows/s and elements/s (L per row) are measured over `batches` batches after `warmup` batches
(worker start-up is reported apart, as startup_s); text/patch elements exclude padding.
"""
import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transfusion_jax.data.config import get_data_config  # noqa: E402
from transfusion_jax.data.pipeline import make_pipeline  # noqa: E402
from transfusion_jax.data.tokenizer import get_tokenizer  # noqa: E402


def measure(tokenizer, args, workers: int) -> dict:
    config = get_data_config(seq_len=args.seq_len, batch_size=args.batch_size, worker_count=workers)
    start = time.perf_counter()
    pipeline = make_pipeline(config, patches_per_image=args.patches_per_image, tokenizer=tokenizer,
                             shard_index=0, shard_count=1)
    for _ in range(args.warmup):
        next(pipeline)
    startup = time.perf_counter() - start
    before = pipeline.metrics()
    start = time.perf_counter()
    for _ in range(args.batches):
        next(pipeline)
    seconds = time.perf_counter() - start
    after = pipeline.metrics()
    pipeline.close()
    rows = after["rows"] - before["rows"]
    used = (after["text_tokens"] - before["text_tokens"]) + (after["patches"] - before["patches"])
    return {
        "benchmark": "data_pipeline", "source": "shapes", "workers": workers,
        "seq_len": args.seq_len, "batch_size": args.batch_size,
        "patches_per_image": args.patches_per_image, "image_size": config.image_size,
        "max_images": pipeline.max_images, "batches": args.batches,
        "rows_per_s": round(rows / seconds, 2),
        "elements_per_s": round(rows * args.seq_len / seconds, 1),
        "non_padding_elements_per_s": round(used / seconds, 1),
        "padding_fraction": round(after["padding_fraction"], 4),
        "text_to_patch_ratio": round(after["text_to_patch_ratio"], 4),
        "startup_s": round(startup, 2),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seq_len", type=int, default=4096)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--patches_per_image", type=int, default=64)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        tokenizer = get_tokenizer(get_data_config(), workdir)
    for workers in args.workers:
        print(json.dumps(measure(tokenizer, args, workers)), flush=True)


if __name__ == "__main__":
    main()
