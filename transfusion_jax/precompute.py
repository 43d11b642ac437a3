"""Encode a data source's images once, with the frozen autoencoder, into ArrayRecord shards that
the data pipeline reads in place of pixels: pod-scale runs then skip the encoder in every step.

    python -m transfusion_jax.precompute --config experiments/transfusion.py:ARG \\
        --autoencoder AE_WORKDIR --out DIR [--shards N] [--batch_size B] [--overwrite] \\
        [--config.key=value ...]

and train with
    --config.data.image_source=latents --config.data.latents_dir=DIR \\
    --config.autoencoder.kind=vae --config.autoencoder.checkpoint=AE_WORKDIR

The Chameleon baseline reads its images as a VQ-VAE's code ids; precompute them the same way
with its config and VQ-VAE, and train with the same data flags:
    python -m transfusion_jax.precompute --config experiments/chameleon.py:ARG \\
        --autoencoder VQ_WORKDIR --out DIR
    python -m transfusion_jax.train --config experiments/chameleon.py:ARG \\
        --config.data.image_source=latents --config.data.latents_dir=DIR \\
        --config.autoencoder.checkpoint=VQ_WORKDIR
The kind stored is the autoencoder's (manifest "kind": "vae" | "vq"); the trainer refuses a
folder of the other family's kind at start.

It reads `config.data`'s image source (the one the pipeline would build, so record i of DIR is
record i of that source), loads every image as the pipeline does (data.image_size, RGB in
[-1, 1]), encodes them in jitted batches of B (VAE: the raw posterior mean, float32, normalised
later in the train step; VQ-VAE: the int32 code ids) and writes the records, images replaced
by their latents, in order into N contiguous shards, then manifest.json. The format is in
transfusion_jax/data/latent_records.py. --autoencoder defaults to config.autoencoder.checkpoint.

img2dataset shards (data.image_source webdataset / parquet, issue 15) are not indexed: they are
encoded in their deterministic order (one epoch, no shuffle, every shard in data.shards' order,
each in file order), latents shard k from source shard k (--shards does not apply); record i of
DIR is then the i-th sample of that order, bad samples included as {"error": reason} records.

One process encodes everything (on its first device); shapes-world and local-file sources are
read with data.read_threads threads. Progress (records/s) goes to stderr every 10 s.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from transfusion_jax.core import checkpoint, cli
from transfusion_jax.data import latent_records
from transfusion_jax.data.config import validate_data_config
from transfusion_jax.data.documents import SkipDocument, load_image
from transfusion_jax.data.shards import ShardSource
from transfusion_jax.data.sources import build_image_source
from transfusion_jax.models.autoencoder import loader
from transfusion_jax.models.autoencoder.model import Autoencoder, downsample_factor

AE_HINT = ("the workdir of a trained autoencoder (python -m transfusion_jax.train_autoencoder "
           "--config experiments/autoencoder.py:kind=vae --workdir DIR)")

# ============================================================================ the encoder


@dataclasses.dataclass(frozen=True)
class Encoder:
    kind: str               # "vae" | "vq"
    fn: Callable            # jitted (variables, pixels [B, S, S, 3]) -> latents [B, *latent_shape]
    variables: Any
    latent_shape: tuple     # (h, w, C) for the VAE, (h, w) for the VQ-VAE's ids
    info: dict              # the manifest's "autoencoder" entry


def load_encoder(workdir: str, image_size: int, batch_size: int) -> Encoder:
    """The frozen VAE (its posterior mean, through codec.Codec.encode_mean) or VQ-VAE (its
    code ids) of an autoencoder workdir, for image_size x image_size images."""
    if not workdir:
        raise ValueError(f"--autoencoder: none given and config.autoencoder.checkpoint is "
                         f"empty; expected {AE_HINT}")
    try:
        ae_config = checkpoint.read_config(workdir)
    except FileNotFoundError:
        raise ValueError(f"--autoencoder = {workdir!r}: no config.json there; expected "
                         f"{AE_HINT}") from None
    kind, factor = ae_config.model.kind, downsample_factor(ae_config.model)
    if kind not in latent_records.KINDS:
        raise ValueError(f"--autoencoder = {workdir!r}: a {kind!r} autoencoder; expected one of "
                         f"{sorted(latent_records.KINDS)}")
    if image_size % factor:
        raise ValueError(f"data.image_size = {image_size}: the autoencoder in {workdir!r} "
                         f"downsamples by {factor}; expected a multiple of {factor}")
    try:
        if kind == "vae":
            codec = loader.load_codec(ml_collections.ConfigDict(
                dict(kind="vae", checkpoint=workdir, downsample=factor)))
            # float32 whatever the VAE computes in (bfloat16 at paper size): lossless, and
            # what the train step normalises.
            fn = jax.jit(lambda v, x: codec.encode_mean(v, x).astype(jnp.float32))
            variables = codec.variables
            with open(os.path.join(workdir, "latent_stats.json")) as f:  # what the Codec read
                stats = json.load(f)
        else:
            _, variables, _ = loader.load_frozen(workdir)
            model = Autoencoder(ae_config.model)
            fn = jax.jit(lambda v, x: model.apply(v, x, method=Autoencoder.encode).ids
                         .astype(jnp.int32))
            stats = None
    except FileNotFoundError as e:  # no checkpoint, or a VAE without latent_stats.json
        raise ValueError(f"--autoencoder = {workdir!r}: {e}; expected {AE_HINT}") from None
    pixels = jax.ShapeDtypeStruct((batch_size, image_size, image_size, 3), jnp.float32)
    shape = tuple(jax.eval_shape(fn, variables, pixels).shape[1:])
    info = {"workdir": os.path.abspath(workdir), "kind": kind, "downsample": factor,
            "step": latent_records.checkpoint_step(workdir),
            "image_size": ae_config.data.image_size, "latent_stats": stats}
    return Encoder(kind, fn, variables, shape, info)


def encode_images(encoder: Encoder, pixels: list[np.ndarray], batch_size: int) -> list[np.ndarray]:
    """Latents of each image, in batches of exactly batch_size (the last one zero-padded: one
    compiled shape). All batches are dispatched before any is read back."""
    outputs = []
    for start in range(0, len(pixels), batch_size):
        x = np.stack(pixels[start:start + batch_size])
        n = len(x)
        if n < batch_size:
            x = np.concatenate([x, np.zeros((batch_size - n, *x.shape[1:]), x.dtype)])
        outputs.append((encoder.fn(encoder.variables, x), n))
    return [z for y, n in outputs for z in np.asarray(y)[:n]]

# ============================================================================ records


def read_record(source, index: int, image_size: int) -> tuple[Any, list[np.ndarray]]:
    """(source record i with each image replaced by its number in the returned pixel list, or
    by {"error": reason} where it does not load, as the pipeline would load it; pixels)."""
    return record_template(source[index], image_size)


def record_template(record, image_size: int) -> tuple[Any, list[np.ndarray]]:
    """read_record of a record already read (a shard source's, which is not indexed)."""
    pixels = []

    def load(value):
        try:
            pixels.append(load_image(value, image_size))
        except SkipDocument as e:
            return {"error": e.reason}
        return len(pixels) - 1  # a placeholder: an int, as no image value stays one

    return latent_records.map_images(record, load), pixels


def record_bytes(index: int, template, latents: list[np.ndarray]) -> bytes:
    """The stored record: the template's placeholders replaced by latent payloads."""
    record = latent_records.map_images(
        template, lambda v: latent_records.latents_payload(latents[v]) if isinstance(v, int) else v)
    try:
        return latent_records.pack_record(index, record)
    except UnicodeEncodeError:  # a str with lone surrogates: the pixel path's invalid_utf8
        return latent_records.pack_record(index, {"error": "invalid_utf8"})
    except (TypeError, ValueError, OverflowError):  # a value msgpack cannot store
        return latent_records.pack_record(index, {"error": "bad_record"})

# ============================================================================ the command


class _Progress:
    """records/s on stderr every `every_s` seconds and at the end."""

    def __init__(self, total: int | None, every_s: float):  # None: not known (shards)
        self.total, self.every_s = total, every_s
        self.start = self.last = time.perf_counter()

    def update(self, done: int, images: int, final: bool = False):
        now = time.perf_counter()
        if not final and now - self.last < self.every_s:
            return
        self.last = now
        rate = done / max(now - self.start, 1e-9)
        if self.total is None:
            where, eta = f"{done} records", ""
        else:
            left = (self.total - done) / rate if rate else float("inf")
            where = f"{done}/{self.total} records ({100 * done / self.total:.1f}%)"
            eta = "" if final else f", eta {left:.0f}s"
        print(f"precompute: {where}, {images} images, {rate:.1f} records/s, "
              f"{now - self.start:.0f}s elapsed{eta}", file=sys.stderr, flush=True)


def _check_out(out: str, overwrite: bool) -> list[str]:
    """--out must be new or empty; with overwrite it may hold a previous precompute, whose
    files are returned (to remove once the encoder and the source have loaded)."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out = {out!r}: a file; expected a folder")
    present = sorted(os.listdir(out)) if os.path.isdir(out) else []
    if present and not overwrite:
        raise ValueError(f"--out = {out!r}: not empty ({len(present)} entries); expected an "
                         "empty or new folder, or --overwrite to replace a precompute there")
    others = [f for f in present if f != latent_records.MANIFEST
              and not (f.startswith("latents-") and f.endswith(".array_record"))]
    if others:
        raise ValueError(f"--out = {out!r}: holds files precompute did not write ({others[:3]}); "
                         "expected a folder of a previous precompute to overwrite")
    # The manifest first: an overwrite cut short leaves a folder that reads as unfinished.
    return sorted(present, key=lambda f: f != latent_records.MANIFEST)


def precompute(config, out: str, *, autoencoder: str = "", shards: int = 1,
               batch_size: int = 64, overwrite: bool = False, log_every_s: float = 10.0) -> dict:
    """Encodes config.data's image source into `out`; returns the manifest (also written)."""
    if "data" not in config:
        raise ValueError("--config: no `data` field; expected an experiment config such as "
                         "experiments/transfusion.py")
    data = config.data
    validate_data_config(data)
    if data.image_source in ("none", "latents"):
        raise ValueError(f"data.image_source = {data.image_source!r}: expected a source of "
                         "images to encode (shapes, coco, image_files, webdataset, parquet)")
    if shards < 1 or batch_size < 1:
        field, value = ("--shards", shards) if shards < 1 else ("--batch_size", batch_size)
        raise ValueError(f"{field} = {value}: expected an integer >= 1")
    previous = _check_out(out, overwrite)
    ae_dir = autoencoder or config.get("autoencoder", {}).get("checkpoint", "")
    encoder = load_encoder(ae_dir, data.image_size, batch_size)
    _check_family(config, ae_dir, encoder.kind)
    source = build_image_source(data)
    stream = isinstance(source, ShardSource)  # img2dataset shards: not indexed
    if not stream and shards > len(source):
        raise ValueError(f"--shards = {shards}: the source has only {len(source)} records; "
                         "expected at most one shard per record")
    os.makedirs(out, exist_ok=True)
    for f in previous:
        os.remove(os.path.join(out, f))
    if stream:
        counts = _write_source_shards(data, source, encoder, out, batch_size,
                                      _Progress(None, log_every_s))
    else:
        counts = _write_shards(data, source, encoder, out, shards, batch_size,
                               _Progress(len(source), log_every_s))
    num_records = sum(s["num_records"] for s in counts["shards"])
    manifest = {"format": latent_records.FORMAT, "kind": encoder.kind, "dtype": latent_records.KINDS[encoder.kind],
                "latent_shape": list(encoder.latent_shape), "num_records": num_records,
                **counts, "autoencoder": encoder.info, "data": data.to_dict()}
    tmp = os.path.join(out, latent_records.MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=2, sort_keys=True)
    os.replace(tmp, os.path.join(out, latent_records.MANIFEST))  # last: its presence marks a finished run
    return manifest


def _check_family(config, ae_dir: str, kind: str) -> None:
    """A config of a model family (model.family) precomputes the kind that family reads
    (latent_records.FAMILY_KINDS): a VAE for Transfusion, a VQ-VAE for Chameleon."""
    model = config.get("model")
    family = model.get("family", "transfusion") if model is not None else None
    wanted = latent_records.FAMILY_KINDS.get(family)
    if wanted is not None and kind != wanted:
        raise ValueError(f"--autoencoder = {ae_dir!r}: a {kind!r} autoencoder, but the config's "
                         f"model.family = {family!r} reads {wanted!r} latents; expected a "
                         f"{wanted!r} autoencoder (experiments/autoencoder.py:kind={wanted})")


def _write_shards(data, source, encoder: Encoder, out: str, num_shards: int, batch_size: int,
                  progress: _Progress) -> dict:
    """Writes every record, in order, in chunks of a few encoder batches (bounded memory)."""
    from array_record.python.array_record_module import ArrayRecordWriter

    chunk = 4 * batch_size  # records per chunk: about 4+ full batches of images
    done = images = failed = 0
    shards = []
    with ThreadPoolExecutor(max(1, data.read_threads)) as pool:
        for k, (lo, hi) in enumerate(latent_records.shard_bounds(len(source), num_shards)):
            name = latent_records.shard_name(k, num_shards)
            # group_size:1: each record its own chunk, for random access (Grain's advice).
            writer = ArrayRecordWriter(os.path.join(out, name), "group_size:1")
            for start in range(lo, hi, chunk):
                indices = range(start, min(start + chunk, hi))
                read = list(pool.map(lambda i: read_record(source, i, data.image_size), indices))
                n_images, n_failed = _write_chunk(writer, start, read, encoder, batch_size)
                done, images, failed = done + len(indices), images + n_images, failed + n_failed
                progress.update(done, images)
            writer.close()
            shards.append({"file": name, "num_records": hi - lo})
    progress.update(done, images, final=True)
    return {"num_images": images, "num_failed_images": failed, "shards": shards}


def _write_chunk(writer, first_index: int, read, encoder: Encoder, batch_size: int):
    """Encodes the images of consecutive record templates and writes the records; returns
    (images encoded, images that failed to load)."""
    pixels = [p for _, ps in read for p in ps]
    latents = encode_images(encoder, pixels, batch_size) if pixels else []
    at = 0
    for i, (template, ps) in enumerate(read, start=first_index):
        writer.write(record_bytes(i, template, latents[at:at + len(ps)]))
        at += len(ps)
    return len(pixels), sum(_errors(t) for t, _ in read)


def _write_source_shards(data, source: ShardSource, encoder: Encoder, out: str, batch_size: int,
                         progress: _Progress) -> dict:
    """A shard source (img2dataset tar / Parquet, issue 15) in its deterministic order: one
    epoch, no shuffle, every shard, each read in file order. Latents shard k holds source
    shard k's records (--shards does not apply), so record i of the folder is the i-th record
    of source.records(); bad samples keep their place as {"error": reason} records."""
    from array_record.python.array_record_module import ArrayRecordWriter

    chunk = 4 * batch_size
    done = images = failed = 0
    shards = []
    with ThreadPoolExecutor(max(1, data.read_threads)) as pool:
        for k in range(len(source.paths)):
            name = latent_records.shard_name(k, len(source.paths))
            writer = ArrayRecordWriter(os.path.join(out, name), "group_size:1")
            records, first = source.shard_records(k), done
            while batch := list(itertools.islice(records, chunk)):
                read = list(pool.map(lambda r: record_template(r, data.image_size), batch))
                n_images, n_failed = _write_chunk(writer, done, read, encoder, batch_size)
                done, images, failed = done + len(batch), images + n_images, failed + n_failed
                progress.update(done, images)
            writer.close()
            shards.append({"file": name, "num_records": done - first})
    progress.update(done, images, final=True)
    return {"num_images": images, "num_failed_images": failed, "shards": shards}


def _errors(template) -> int:
    """Images of a record template that failed to load ({"error": reason} in their place)."""
    failed = []

    def visit(value):
        failed.append(isinstance(value, dict))
        return value

    latent_records.map_images(template, visit)
    return sum(failed)


def main():
    from absl import flags
    from ml_collections import config_flags

    config = config_flags.DEFINE_config_file("config", None, "experiments/transfusion.py[:arg]",
                                             lock_config=True)
    autoencoder = flags.DEFINE_string("autoencoder", "", "the autoencoder's workdir "
                                      "(default: config.autoencoder.checkpoint)")
    out = flags.DEFINE_string("out", None, "the folder to write the shards and manifest to")
    shards = flags.DEFINE_integer("shards", 1, "ArrayRecord files to split the records over")
    batch_size = flags.DEFINE_integer("batch_size", 64, "images per encoder call")
    overwrite = flags.DEFINE_bool("overwrite", False, "replace a previous precompute in --out")

    def _main():
        if config.value is None or not out.value:
            sys.exit("error: --config and --out are required")
        m = precompute(config.value, out.value, autoencoder=autoencoder.value,
                       shards=shards.value, batch_size=batch_size.value,
                       overwrite=overwrite.value)
        print(f"precompute: {m['num_records']} records, {m['num_images']} images "
              f"({m['num_failed_images']} failed to load), {m['kind']} latents "
              f"{tuple(m['latent_shape'])}, in {len(m['shards'])} shards under {out.value}; "
              f"train with --config.data.image_source=latents "
              f"--config.data.latents_dir={out.value}", file=sys.stderr)

    cli.run_flags(_main)  # the trainers' parser (bad overrides are named), quiet logs


if __name__ == "__main__":
    main()
