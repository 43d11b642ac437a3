"""Data pipeline throughput: one JSON line per worker count.

    .venv/bin/python benchmarks/data_pipeline.py [--seq_len 4096] [--batch_size 8]
        [--patches_per_image 64] [--workers 0 2] [--batches 40] [--warmup 5]
        [--source shapes|webdataset|mixture] [--shards 16 --samples_per_shard 200 --jpeg_px 384
         --image_size 256]

rows/s and elements/s (L per row) are measured over `batches` batches after `warmup` batches
(worker start-up is reported apart, as startup_s); text/patch elements exclude padding.
With --workers 0 cpu_ms_per_image is the CPU time (all threads) per image placed in a row,
everything included: the figure to size hosts by on a machine others share.

--source webdataset (issue 15) writes `shards` local tar shards in img2dataset's layout
(KEY.jpg + KEY.txt + KEY.json) of photo-like 4:3 JPEGs `jpeg_px` wide (smooth random colour
fields with grain, quality 90, mean size reported; img2dataset's resize_mode=keep_ratio), and measures the pipeline reading them as
data.image_source "webdataset" next to the shapes text stream at 1:1 tokens:patches: tar
reading, JPEG decode and the resize to `image_size` are all in the measured path. images_per_s
counts images placed in rows.
"""
import argparse
import io
import json
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transfusion_jax.data.config import get_data_config  # noqa: E402
from transfusion_jax.data.pipeline import make_pipeline  # noqa: E402
from transfusion_jax.data.tokenizer import get_tokenizer  # noqa: E402


def photo_like(rng: np.random.Generator, px: int) -> bytes:
    """A 4:3 JPEG, px wide, that decodes like a photo: a smooth colour field (8x6 noise
    upsampled) with per-pixel grain, so its size and decode cost are a photo's, not a flat
    image's; not square, so the pipeline's resize and centre crop run."""
    h = px * 3 // 4
    field = Image.fromarray(rng.integers(0, 256, (6, 8, 3), np.uint8)).resize((px, h), Image.BICUBIC)
    pixels = np.asarray(field, np.int16) + rng.integers(-12, 13, (h, px, 3))
    out = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(out, "JPEG", quality=90)
    return out.getvalue()


def write_shards(folder: Path, args) -> tuple[str, float]:
    """img2dataset-layout tar shards; returns (glob, mean JPEG bytes)."""
    rng = np.random.default_rng(0)
    words = ["red", "green", "blue", "circle", "square", "triangle", "small", "large", "left", "right"]
    sizes = []
    for s in range(args.shards):
        with tarfile.open(folder / f"{s:05d}.tar", "w") as tar:
            for i in range(args.samples_per_shard):
                image = photo_like(rng, args.jpeg_px)
                caption = "a " + " ".join(rng.choice(words, 8))
                sizes.append(len(image))
                for ext, data in (("jpg", image), ("txt", caption.encode()),
                                  ("json", json.dumps({"caption": caption}).encode())):
                    info = tarfile.TarInfo(f"{s:05d}{i:04d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return str(folder / "*.tar"), float(np.mean(sizes))


def mixture(pattern: str, shards: int) -> tuple:
    """data.mixture: shapes-world text at half the elements, the shards split into two image
    sets of a quarter each (their own streams, as two img2dataset sets)."""
    paths = [pattern.replace("*", f"{s:05d}") for s in range(shards)]
    half = shards // 2
    return ({"name": "text", "text_source": "shapes", "weight": 1.0},
            {"name": "set_a", "image_source": "webdataset", "shards": ",".join(paths[:half]),
             "weight": 0.5},
            {"name": "set_b", "image_source": "webdataset", "shards": ",".join(paths[half:]),
             "weight": 0.5})


def measure(tokenizer, args, workers: int, **source) -> dict:
    config = get_data_config(seq_len=args.seq_len, batch_size=args.batch_size, worker_count=workers,
                             **source)
    start = time.perf_counter()
    pipeline = make_pipeline(config, patches_per_image=args.patches_per_image, tokenizer=tokenizer,
                             shard_index=0, shard_count=1)
    for _ in range(args.warmup):
        next(pipeline)
    startup = time.perf_counter() - start
    before = pipeline.metrics()
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(args.batches):
        next(pipeline)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    after = pipeline.metrics()
    pipeline.close()
    rows = after["rows"] - before["rows"]
    used = (after["text_tokens"] - before["text_tokens"]) + (after["patches"] - before["patches"])
    return {
        "benchmark": "data_pipeline", "source": args.source, "workers": workers,
        "seq_len": args.seq_len, "batch_size": args.batch_size,
        "patches_per_image": args.patches_per_image, "image_size": config.image_size,
        "max_images": pipeline.max_images, "batches": args.batches,
        "rows_per_s": round(rows / seconds, 2),
        "images_per_s": round((after["images"] - before["images"]) / seconds, 1),
        "elements_per_s": round(rows * args.seq_len / seconds, 1),
        "non_padding_elements_per_s": round(used / seconds, 1),
        "padding_fraction": round(after["padding_fraction"], 4),
        "text_to_patch_ratio": round(after["text_to_patch_ratio"], 4),
        "startup_s": round(startup, 2),
        **{k: round(v, 4) for k, v in after.items() if k.startswith("mix/") and
           k.endswith("/share")},
        # CPU of this process (all its threads) per image placed: the whole pipeline's cost
        # with workers 0; with workers it leaves out theirs, so it is not reported.
        **({"cpu_ms_per_image": round(1e3 * cpu / max(after["images"] - before["images"], 1), 2)}
           if workers == 0 else {}),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seq_len", type=int, default=4096)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--patches_per_image", type=int, default=64)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--source", choices=["shapes", "webdataset", "mixture"], default="shapes",
                        help="mixture: data.mixture of shapes text (weight 1) and the tar "
                             "shards as two image sets (weights 0.5 + 0.5)")
    parser.add_argument("--shards", type=int, default=16)
    parser.add_argument("--samples_per_shard", type=int, default=200)
    parser.add_argument("--jpeg_px", type=int, default=384, help="JPEG width (height 3/4 of it)")
    parser.add_argument("--image_size", type=int, default=0, help="data.image_size; 0: the default")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        tokenizer = get_tokenizer(get_data_config(), workdir)
        source = {"image_size": args.image_size} if args.image_size else {}
        extra = {}
        if args.source in ("webdataset", "mixture"):
            start = time.perf_counter()
            pattern, mean_bytes = write_shards(Path(workdir), args)
            source.update(image_source="webdataset", shards=pattern)
            if args.source == "mixture":
                source = {**source, "mixture": mixture(pattern, args.shards)}
            extra = {"shards": args.shards, "samples_per_shard": args.samples_per_shard,
                     "jpeg_px": args.jpeg_px, "mean_jpeg_bytes": round(mean_bytes),
                     "write_s": round(time.perf_counter() - start, 1)}
        for workers in args.workers:
            print(json.dumps({**measure(tokenizer, args, workers, **source), **extra}), flush=True)


if __name__ == "__main__":
    main()
