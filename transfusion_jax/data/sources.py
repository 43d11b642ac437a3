"""Random-access sources of records (the record format is in documents.py).

Every source is a picklable sequence (`__len__`, `__getitem__`) so that Grain can shuffle it
globally, shard it by host and hand it to worker processes. Sources only index and read; all
decoding and validation happens in documents.py, so a bad record becomes a counted skip there
(a record {"error": reason} carries a problem found while reading). LatentsSource
(latent_records.py) reads the images of one of these sources precomputed as latents.
ShardSource (shards.py: img2dataset's tar and Parquet shards) is the exception: it is not
indexed, it streams its shards in a seeded order of its own (pipeline.source_stream).
"""
from __future__ import annotations

import itertools
import json
import os

import numpy as np

from transfusion_jax.data import mixture
from transfusion_jax.data.shapes import text as shapes_text
from transfusion_jax.data.latent_records import LatentsSource
from transfusion_jax.data.shards import FORMATS as SHARD_FORMATS, ShardSource
from transfusion_jax.data.shapes.world import scene_rng

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")


class ShapesSource:
    """The shapes world. kind "text": text-only documents; kind "image": caption-image pairs,
    and interleaved (image, question, answer)* documents with `interleaved_fraction`."""

    def __init__(self, kind: str, *, seed: int, split: str, num_documents: int,
                 image_size: int, interleaved_fraction: float):
        assert kind in ("text", "image"), kind
        self.kind, self.seed, self.split = kind, seed, split
        self.num_documents, self.image_size = num_documents, image_size
        self.interleaved_fraction = interleaved_fraction

    def __len__(self) -> int:
        return self.num_documents

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        if self.kind == "text":
            return shapes_text.text_record(self.seed, self.split, index)
        if scene_rng(self.seed, self.split, index, stream=5).random() < self.interleaved_fraction:
            return shapes_text.interleaved_record(self.seed, self.split, index, self.image_size)
        return shapes_text.pair_record(self.seed, self.split, index, self.image_size)


class TfdsTextSource:
    """A TFDS text data set through `tfds.data_source` (ArrayRecord, random access). The data
    must already be prepared in `data_dir`: nothing downloads at run time."""

    def __init__(self, name: str, *, split: str, data_dir: str, text_key: str):
        import tensorflow_datasets as tfds
        import tensorflow_datasets.text  # noqa: F401  registers c4, wiki40b, ... without TensorFlow

        self.text_key = text_key
        self._source = tfds.data_source(name, split=split, data_dir=data_dir or None, download=False)

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict:
        example = self._source[int(index)]
        if self.text_key not in example:
            return {"error": "bad_record"}
        return {"text": example[self.text_key]}


class CocoKarpathySource:
    """MS-COCO from its own files: the Karpathy split json (dataset_coco.json) and the image
    folders (`image_root`/<filepath>/<filename>). One record per image with all its captions;
    the document builder draws one caption per use."""

    def __init__(self, karpathy_json: str, *, image_root: str, splits: str):
        wanted = set(splits.split("+"))
        with open(karpathy_json, "rb") as f:
            images = json.load(f)["images"]
        self._items = [
            (os.path.join(image_root, im.get("filepath", ""), im["filename"]),
             [s["raw"] for s in im.get("sentences", [])])
            for im in images if im.get("split") in wanted
        ]
        if not self._items:
            raise ValueError(f"data.coco_split = {splits!r}: no images of those splits in "
                             f"{karpathy_json}; expected a '+'-joined subset of train, restval, val, test")

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, index: int) -> dict:
        path, captions = self._items[int(index)]
        return {"image": path, "caption": captions}


class _Lines:
    """Non-empty lines of a file, by byte offsets; read with pread (no handle is pickled)."""

    def __init__(self, path: str):
        self.path = path
        data = np.fromfile(path, np.uint8)
        ends = np.flatnonzero(data == ord("\n"))
        ends = np.append(ends, len(data)) if len(data) and data[-1] != ord("\n") else ends
        starts = np.concatenate([[0], ends[:-1] + 1]).astype(np.int64)
        keep = ends > starts
        self.starts, self.ends = starts[keep], ends[keep].astype(np.int64)
        self._fd = None

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, index: int) -> bytes:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        start, end = int(self.starts[index]), int(self.ends[index])
        return os.pread(self._fd, end - start, start).rstrip(b"\r")

    def __getstate__(self):
        return {**self.__dict__, "_fd": None}


def _json_line(line: bytes) -> dict:
    try:
        record = json.loads(line)
    except UnicodeDecodeError:
        return {"error": "invalid_utf8"}
    except ValueError:
        return {"error": "bad_record"}
    return record if isinstance(record, dict) else {"error": "bad_record"}


class TextFilesSource:
    """A .txt (one document a line), a .jsonl ({"text": ...} a line) or a folder of .txt files
    (one document a file)."""

    def __init__(self, path: str):
        if not os.path.exists(path):
            raise ValueError(f"data.text_files_path = {path!r}: no such file or folder")
        self.path = path
        if os.path.isdir(path):
            self._files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".txt"))
            self._lines = None
        else:
            self._files, self._lines = None, _Lines(path)

    def __len__(self) -> int:
        return len(self._files) if self._files is not None else len(self._lines)

    def __getitem__(self, index: int) -> dict:
        if self._files is not None:
            with open(self._files[int(index)], "rb") as f:
                return {"text": f.read()}
        line = self._lines[int(index)]
        return _json_line(line) if self.path.endswith(".jsonl") else {"text": line}


class ImageFilesSource:
    """A folder of images with same-named .txt captions (a.jpg + a.txt), or a JSONL of
    {"image": path relative to the JSONL's folder (or absolute), "caption": text}."""

    def __init__(self, path: str):
        if not os.path.exists(path):
            raise ValueError(f"data.image_files_path = {path!r}: no such file or folder")
        self.path = path
        if os.path.isdir(path):
            self._images = sorted(os.path.join(path, f) for f in os.listdir(path)
                                  if f.lower().endswith(IMAGE_EXTENSIONS))
            self._lines = None
        else:
            self._images, self._lines = None, _Lines(path)

    def __len__(self) -> int:
        return len(self._images) if self._images is not None else len(self._lines)

    def __getitem__(self, index: int) -> dict:
        if self._images is not None:
            image = self._images[int(index)]
            caption_file = os.path.splitext(image)[0] + ".txt"
            caption = b""
            if os.path.exists(caption_file):
                with open(caption_file, "rb") as f:
                    caption = f.read().strip()
            return {"image": image, "caption": caption}
        record = _json_line(self._lines[int(index)])
        if "error" in record:
            return record
        if not isinstance(record.get("image"), str):
            return {"error": "bad_record"}
        image = os.path.join(os.path.dirname(os.path.abspath(self.path)), record["image"])
        return {"image": image, "caption": record.get("caption", "")}


def build_text_source(c):
    """The text-only document source of a data config; None for "none"."""
    return _non_empty(c, "text_source", {
        "shapes": lambda: ShapesSource("text", **_shapes_args(c)),
        "tfds": lambda: TfdsTextSource(c.tfds_name, split=c.tfds_split,
                                       data_dir=c.tfds_data_dir, text_key=c.tfds_text_key),
        "text_files": lambda: TextFilesSource(c.text_files_path),
        "none": lambda: None,
    }[c.text_source]())


def build_image_source(c):
    """The image document source of a data config; None for "none". Also what precompute
    encodes, so record i of a latents folder is record i of this source."""
    return _non_empty(c, "image_source", {
        "shapes": lambda: ShapesSource("image", **_shapes_args(c)),
        "coco": lambda: CocoKarpathySource(c.coco_karpathy_json, image_root=c.coco_image_root,
                                           splits=c.coco_split),
        "image_files": lambda: ImageFilesSource(c.image_files_path),
        "latents": lambda: LatentsSource(c.latents_dir),
        **{fmt: (lambda fmt=fmt: ShardSource(
            fmt, c.shards, image_key=c.shard_image_key, caption_key=c.shard_caption_key,
            min_image_size=c.min_image_size, cycle_length=c.cycle_length))
           for fmt in SHARD_FORMATS},
        "none": lambda: None,
    }[c.image_source]())


def build_sources(c) -> tuple[object | None, object | None]:
    """(text source, image source) of a data config; None where the config says "none"."""
    return build_text_source(c), build_image_source(c)


def build_mixture_sources(c) -> list:
    """The source of each data.mixture entry, in order (data/mixture.py: entry_config)."""
    return [(build_text_source if mixture.kind(entry) == "text" else build_image_source)(
        mixture.entry_config(c, i)) for i, entry in enumerate(mixture.entries(c))]


def _shapes_args(c) -> dict:
    return dict(seed=c.shapes_seed, split=c.shapes_split, num_documents=c.shapes_num_documents,
                image_size=c.image_size, interleaved_fraction=c.shapes_interleaved_fraction)


def _non_empty(c, name: str, source):
    # A shard source is not indexed: resolve_shards has already refused an empty shard list.
    if source is not None and not isinstance(source, ShardSource) and len(source) == 0:
        raise ValueError(f"data.{name} = {c[name]!r}: the source has no documents")
    return source


def record_texts(record: dict) -> list[str]:
    """The text in a record (captions included, images not loaded), for tokenizer training."""
    values = [record.get("text")]
    caption = record.get("caption")
    values += caption if isinstance(caption, (list, tuple)) else [caption]
    values += [p.get("text") for p in record.get("parts", ()) if isinstance(p, dict)]
    out = []
    for v in values:
        if isinstance(v, bytes):
            v = v.decode("utf-8", errors="ignore")
        if isinstance(v, str) and v.strip():
            out.append(v)
    return out


def sample_texts(c, count: int) -> list[str]:
    """Up to `count` texts from the start of the configured sources, half from each."""
    sources = [s for s in (build_mixture_sources(c) if mixture.entries(c) else build_sources(c))
               if s is not None]
    texts = []
    for source in sources:
        records = (itertools.islice(source.records(), count // len(sources))
                   if isinstance(source, ShardSource)
                   else (source[i] for i in range(min(len(source), count // len(sources)))))
        for record in records:
            texts.extend(record_texts(record))
    return texts
