"""Precomputed latents on disk: the format transfusion_jax.precompute writes and the `latents`
image source (data.image_source = "latents", data.latents_dir = DIR) reads.

A folder of precomputed latents holds

    latents-00000-of-0000N.array_record ...   ArrayRecord shards; record i of the data set is
                                              shard-local record i - (records of earlier shards)
    manifest.json                             written last: a folder without one is unfinished

Each ArrayRecord record is msgpack (no pickle: reading runs no code) of

    {"index": i, "record": RECORD}

where i is the record's index in the source it was encoded from (checked on read: the shards
are in order) and RECORD is that source record (documents.py) with every image replaced by

    {"latents": raw bytes, little-endian, C order, "dtype": "<f4" | "<i4", "shape": [h, w, C] | [h, w]}

(VAE: the float32 posterior mean, before normalisation; VQ-VAE: the int32 code ids), or by
{"error": reason} where the image failed to load (missing, corrupt, bad shape): the document
builder skips it with that reason, at the point where the pixel path would have. Text values
keep their type (str, or bytes as msgpack bin). A record that msgpack cannot store (a value of
another type) is written as {"error": "bad_record"}, and is skipped as such.

manifest.json:
    format 1; kind "vae" | "vq"; dtype "float32" | "int32"; latent_shape [h, w, C] | [h, w];
    num_records; num_images (encoded); num_failed_images ({"error"} in their place);
    shards [{"file", "num_records"}]; autoencoder {workdir, kind, downsample, step, image_size
    (what it was trained on), latent_stats (VAE: shift, scale; the trainer's normalisation)};
    data (the data config the records were read with: image_source, image_size, ...).

Who reads which kind (FAMILY_KINDS): the Transfusion model VAE latents, the Chameleon baseline
VQ code ids; the pipeline and the trainer refuse the other kind at start (check_kind). In a
batch, VAE latents are `latents` float32 [B, M, h, w, C]; VQ code ids `latents` int32
[B, M, h, w], exact (documents.image_slot).
"""
from __future__ import annotations

import json
import math
import os

import msgpack
import numpy as np

FORMAT = 1
MANIFEST = "manifest.json"
KINDS = {"vae": "float32", "vq": "int32"}  # kind -> dtype of the stored latents


def shard_name(index: int, count: int) -> str:
    return f"latents-{index:05d}-of-{count:05d}.array_record"


def shard_bounds(num_records: int, num_shards: int) -> list[tuple[int, int]]:
    """[start, stop) of each shard: contiguous, in order, sizes differing by at most one."""
    cuts = [num_records * k // num_shards for k in range(num_shards + 1)]
    return list(zip(cuts[:-1], cuts[1:]))


# ---------------------------------------------------------------------------------------------
# Records.

def map_images(record, fn):
    """`record` with fn(value) in place of each image value, found as DocumentBuilder finds them
    (error and text records have none; a pair's "image"; the "image" of each part)."""
    if not isinstance(record, dict) or "error" in record or "text" in record:
        return record
    if "image" in record:
        return {**record, "image": fn(record["image"])}
    parts = record.get("parts")
    if isinstance(parts, (list, tuple)):
        return {**record, "parts": [{**p, "image": fn(p["image"])}
                                    if isinstance(p, dict) and "image" in p else p
                                    for p in parts]}
    return record


def latents_payload(array: np.ndarray) -> dict:
    """The stored form of one image's latents (float32 means or int32 ids)."""
    array = np.ascontiguousarray(array)
    dtype = array.dtype.newbyteorder("<")  # one byte order on disk, whatever wrote it
    return {"latents": array.astype(dtype, copy=False).tobytes(), "dtype": dtype.str,
            "shape": list(array.shape)}


def payload_latents(value):
    """The inverse of latents_payload; anything else ({"error": ...}, junk) passes through, for
    the document builder to skip with a reason."""
    if not (isinstance(value, dict) and isinstance(value.get("latents"), bytes)):
        return value
    try:
        array = np.frombuffer(value["latents"], np.dtype(value["dtype"])).reshape(value["shape"])
    except (TypeError, ValueError):
        return {"error": "bad_image_shape"}
    return array.astype(array.dtype.newbyteorder("="))  # native order; a writable copy


def pack_record(index: int, record) -> bytes:
    """Raises TypeError/ValueError (or UnicodeEncodeError) for values msgpack cannot store."""
    return msgpack.packb({"index": int(index), "record": record}, use_bin_type=True)


def unpack_record(data: bytes) -> tuple[int, object]:
    """(source index, record with latent arrays in place of the image payloads)."""
    try:
        item = msgpack.unpackb(data, raw=False)
        index, record = int(item["index"]), item["record"]
    except (ValueError, TypeError, KeyError, msgpack.UnpackException):
        return -1, {"error": "bad_record"}
    return index, map_images(record, payload_latents)


# ---------------------------------------------------------------------------------------------
# The manifest and the source.

def _error(latents_dir, problem: str) -> ValueError:
    return ValueError(f"data.latents_dir = {latents_dir!r}: {problem}; expected the --out folder "
                      "of a finished `python -m transfusion_jax.precompute`")


def read_manifest(latents_dir: str) -> dict:
    """The manifest of a precomputed folder, checked: format, kind, shards present."""
    if not os.path.isdir(latents_dir):
        raise _error(latents_dir, "no such folder")
    path = os.path.join(latents_dir, MANIFEST)
    if not os.path.exists(path):
        raise _error(latents_dir, f"no {MANIFEST} (precompute writes it last: an interrupted "
                                  "run leaves none)")
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, ValueError) as e:
        raise _error(latents_dir, f"unreadable {MANIFEST} ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise _error(latents_dir, f"{MANIFEST} format {manifest.get('format')!r} is not {FORMAT}"
                     if isinstance(manifest, dict) else f"{MANIFEST} is not a JSON object")
    if manifest.get("kind") not in KINDS:
        raise _error(latents_dir, f"{MANIFEST} kind {manifest.get('kind')!r} is not one of "
                                  f"{sorted(KINDS)}")
    for shard in manifest["shards"]:
        if not os.path.exists(os.path.join(latents_dir, shard["file"])):
            raise _error(latents_dir, f"shard {shard['file']} listed in {MANIFEST} is missing")
    return manifest


class LatentsSource:
    """Records of a precomputed folder, random access through Grain's ArrayRecordDataSource
    (picklable: worker processes reopen the files). Record i is record i of the source the
    latents were computed from, its images replaced by latent arrays (or {"error": reason})."""

    def __init__(self, latents_dir: str):
        import grain  # here: the format helpers above do not need it

        self.latents_dir = latents_dir
        self.manifest = read_manifest(latents_dir)
        paths = [os.path.join(latents_dir, s["file"]) for s in self.manifest["shards"]]
        self._records = grain.sources.ArrayRecordDataSource(paths)
        if len(self._records) != self.manifest["num_records"]:
            raise _error(latents_dir, f"the shards hold {len(self._records)} records, "
                                      f"{MANIFEST} says {self.manifest['num_records']}")

    @property
    def kind(self) -> str:
        return self.manifest["kind"]

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return tuple(self.manifest["latent_shape"])

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int):
        index = int(index)
        stored, record = unpack_record(self._records[index])
        if stored not in (index, -1):  # -1: an undecodable record, skipped as bad_record
            raise ValueError(f"data.latents_dir = {self.latents_dir!r}: record {index} holds "
                             f"source record {stored}; the shards are out of order or mixed "
                             "from different runs: precompute the folder again")
        return record


# The kind of latents each model family reads (model.family), and what each kind is.
FAMILY_KINDS = {"transfusion": "vae", "chameleon": "vq"}
_DESCRIBED = {"vae": "latents (a VAE's posterior means)", "vq": "code ids (a VQ-VAE's)"}


def expected_kind(latent_shape: tuple[int, ...] | None) -> str:
    """The kind of precomputed latents a model reads, from the shape of one image it expects:
    (h, w, C) VAE latents (Transfusion), (h, w) VQ code ids (Chameleon); None: Transfusion's."""
    if latent_shape is None or len(latent_shape) == 3:
        return "vae"
    if len(latent_shape) == 2:
        return "vq"
    raise ValueError(f"latent_shape = {tuple(latent_shape)}: expected (h, w, C) for VAE latents "
                     "or (h, w) for VQ-VAE code ids")


def check_kind(manifest: dict, latents_dir: str, kind: str) -> None:
    """The folder must hold the kind the run's model family reads (FAMILY_KINDS)."""
    if manifest["kind"] == kind:
        return
    family = {v: k for k, v in FAMILY_KINDS.items()}[kind]
    raise ValueError(
        f"data.latents_dir = {latents_dir!r}: it holds {manifest['kind']!r} "
        f"{_DESCRIBED[manifest['kind']]}, but model.family = {family!r} reads {kind!r} "
        f"{_DESCRIBED[kind]}; expected the --out folder of `python -m transfusion_jax.precompute "
        f"--autoencoder DIR` with DIR a {kind!r} autoencoder (experiments/autoencoder.py:"
        f"kind={kind}), the one in autoencoder.checkpoint")


def check_latents(source: LatentsSource, *, image_size: int, patches_per_image: int,
                  latent_shape: tuple[int, ...] | None = None) -> None:
    """The pipeline's check that the stored latents are what the model will read: of the kind
    `latent_shape` implies (expected_kind: VAE latents for Transfusion, VQ code ids for
    Chameleon), of images of data.image_size, square, cut into `patches_per_image` square
    patches (Chameleon: one code id each); exactly `latent_shape` when the caller gives it."""
    m, where = source.manifest, source.latents_dir
    kind = expected_kind(latent_shape)
    check_kind(m, where, kind)
    encoded_size = m["data"]["image_size"]
    if encoded_size != image_size:
        raise ValueError(f"data.image_size = {image_size}: the latents in {where!r} were encoded "
                         f"from {encoded_size}x{encoded_size} images; expected {encoded_size}")
    shape = tuple(m["latent_shape"])
    if latent_shape is not None and shape != tuple(latent_shape):
        fields = ("model.latent_size, model.latent_size" if kind == "vq" else
                  "model.latent_size, model.latent_size, model.latent_channels")
        raise _error(where, f"latents of shape {shape}, but the model expects "
                            f"{tuple(latent_shape)} ({fields})")
    h, w = shape[:2]
    per_patch = h * w // patches_per_image if h * w % patches_per_image == 0 else 0
    k = math.isqrt(per_patch)
    if h != w or not per_patch or k * k != per_patch or h % k:
        raise _error(where, f"latents of shape {shape} cannot be cut into patches_per_image = "
                            f"{patches_per_image} square patches (the model's (latent_size / "
                            "patch_size)^2)")


def checkpoint_step(workdir: str) -> int | None:
    """The newest checkpoint step of an autoencoder workdir (the one loader.load_frozen
    restores); None without checkpoints."""
    folder = os.path.join(workdir, "checkpoints")
    steps = [int(d) for d in os.listdir(folder) if d.isdigit()] if os.path.isdir(folder) else []
    return max(steps, default=None)


def check_autoencoder(latents_dir: str, checkpoint: str, kind: str = "vae") -> None:
    """For the trainer: the folder must hold the `kind` its model family reads (FAMILY_KINDS:
    "vae" for Transfusion, "vq" for Chameleon), encoded by the autoencoder it runs
    (config.autoencoder.checkpoint): a VAE's latents are normalised with its latent_stats.json,
    which must be the statistics they were encoded with; a VQ-VAE's code ids (it has no
    statistics) must come from the checkpoint step it would load, or they are another
    codebook's."""
    m = read_manifest(latents_dir)
    check_kind(m, latents_dir, kind)
    stored = m["autoencoder"]["workdir"]
    if os.path.realpath(stored) != os.path.realpath(checkpoint):
        raise ValueError(f"autoencoder.checkpoint = {checkpoint!r}: the latents in "
                         f"data.latents_dir = {latents_dir!r} were encoded by {stored!r}; "
                         "expected the same autoencoder")
    if kind == "vq":
        encoded, newest = m["autoencoder"]["step"], checkpoint_step(checkpoint)
        if encoded != newest:
            raise ValueError(f"autoencoder.checkpoint = {checkpoint!r}: its newest checkpoint is "
                             f"step {newest}, the code ids in data.latents_dir = "
                             f"{latents_dir!r} were encoded with step {encoded} (trained on "
                             "since?); expected the same: precompute again")
        return
    stats_path = os.path.join(checkpoint, "latent_stats.json")
    stats = json.load(open(stats_path)) if os.path.exists(stats_path) else None
    if stats != m["autoencoder"]["latent_stats"]:
        raise ValueError(f"autoencoder.checkpoint = {checkpoint!r}: its latent_stats.json is "
                         f"{stats}, the latents in data.latents_dir = {latents_dir!r} were "
                         f"encoded when it was {m['autoencoder']['latent_stats']} (retrained "
                         "since?); expected the same: precompute again")
