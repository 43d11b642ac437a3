"""Image-text shards as img2dataset writes them, read at pod scale (issue 15).

data.image_source "webdataset": tar shards (NNNNN.tar) holding, per sample, consecutive members
KEY.jpg (the image; extensions in data.shard_image_key) and KEY.txt and/or KEY.json (the caption:
the JSON's data.shard_caption_key when it has one, else the .txt). KEY is a member's name up to
the first "." of its base name, WebDataset's convention. data.image_source "parquet": files with
a column of encoded image bytes (the first of data.shard_image_key present) and a caption column
(data.shard_caption_key). data.shards: comma-separated paths or globs, local or gs:// (read
through etils.epath, the layer the checkpoints use), with WebDataset's {00000..01242} ranges.

Hundreds of millions of samples are never indexed and a remote tar is never searched: order is
fixed per shard. Each epoch a seeded permutation of the shard list is dealt to hosts
(perm[shard_index::shard_count]) and, within a host, to Grain's worker processes (set_slice,
which grain's mp_prefetch calls in each worker): disjoint and complete. A worker reads its shards
sequentially, `data.cycle_length` open at a time, one sample from each in turn (so a batch does
not come from one shard). The iterator state is small and exact: epoch, position in the shard
list, and per open shard its id, the byte offset (tar) or row (Parquet) of its next sample and
that sample's ordinal. Restoring seeks there: a tar continues at that header, a Parquet file at
that row's row group (the rows before it in that group are read again and dropped).

Bad samples are {"error": reason} records, counted where documents.py counts every skip: an image
that does not decode (corrupt_image, found by the builder), no image member or column
(missing_image), no caption (empty_caption), an image whose shorter side is under
data.min_image_size (small_image, from the image header alone), and a shard that cannot be read
on (corrupt_shard: a truncated member, a bad header, a file that does not open or parse; the
rest of that shard is skipped).

Each document's random draws (caption dropout, order) come from its identity (epoch, shard,
ordinal in the shard) and the stream's seed, not from how many documents came before it.
"""
from __future__ import annotations

import collections
import io
import json
import re
import tarfile
import zlib
from concurrent.futures import ThreadPoolExecutor

import grain
import numpy as np
from etils import epath
from PIL import Image

FORMATS = ("webdataset", "parquet")
_BLOCK = 512
_ZERO_BLOCK = bytes(_BLOCK)
_GLOB_CHARS = re.compile(r"[*?\[]")
_RANGE = re.compile(r"\{(\d+)\.\.(\d+)\}")


# ---------------------------------------------------------------------------------------------
# The shard list.

def _expand_ranges(pattern: str) -> list[str]:
    """WebDataset's brace ranges: "a-{000..002}.tar" -> a-000.tar, a-001.tar, a-002.tar (zero
    padded to the first bound's width)."""
    m = _RANGE.search(pattern)
    if m is None:
        return [pattern]
    lo, hi = m.group(1), m.group(2)
    heads = [f"{pattern[:m.start()]}{i:0{len(lo)}d}" for i in range(int(lo), int(hi) + 1)]
    return [h + tail for h in heads for tail in _expand_ranges(pattern[m.end():])]


def _glob(pattern: str) -> list[str]:
    """Files matching a glob: the part before the first component with a wildcard is the folder
    listed (through epath, so gs://bucket/cc12m/*.tar lists that prefix)."""
    parts = pattern.split("/")
    first = next(i for i, p in enumerate(parts) if _GLOB_CHARS.search(p))
    base = "/".join(parts[:first]) or ("/" if pattern.startswith("/") else ".")
    return sorted(str(p) for p in epath.Path(base).glob("/".join(parts[first:])))


def resolve_shards(spec, field: str = "shards") -> list[str]:
    """The shard paths of data.shards: a comma-separated string (or a list) of paths, globs
    and {a..b} ranges, in the order given (each glob's matches sorted), duplicates dropped."""
    entries = spec.split(",") if isinstance(spec, str) else list(spec)
    paths = []
    for entry in (str(e).strip() for e in entries):
        for item in _expand_ranges(entry) if entry else []:
            paths.extend(_glob(item) if _GLOB_CHARS.search(item) else [item])
    paths = list(dict.fromkeys(paths))
    if not paths:
        raise ValueError(f"data.{field} = {spec!r}: no shard files match; expected paths or globs "
                         "(local or gs://, comma-separated) of img2dataset's .tar or .parquet files")
    return paths


# ---------------------------------------------------------------------------------------------
# Samples -> records.

class _SampleSpec:
    """Which members/columns are the image and the caption, and the size filter."""

    def __init__(self, image_key: str, caption_key: str, min_image_size: int):
        self.image_keys = tuple(k.strip().lower() for k in image_key.split(";") if k.strip())
        self.caption_key = caption_key
        self.min_image_size = min_image_size

    def record(self, image, caption) -> dict:
        if image is None:
            return {"error": "missing_image"}
        if self.min_image_size and _shorter_side(image) < self.min_image_size:
            return {"error": "small_image"}
        return {"image": image, "caption": caption}  # caption None: the builder's empty_caption

    def tar_record(self, members: dict[str, bytes]) -> dict:
        image = next((members[k] for k in self.image_keys if k in members), None)
        caption = members.get("txt")
        if "json" in members:
            try:
                meta = json.loads(members["json"])
            except ValueError:
                meta = None
            if isinstance(meta, dict) and isinstance(meta.get(self.caption_key), str):
                caption = meta[self.caption_key]
        return self.record(image, caption)


def _shorter_side(data: bytes) -> int:
    """The image's shorter side from its header (PIL decodes nothing yet); an image whose
    header does not parse passes, for the builder to count as corrupt_image."""
    try:
        return min(Image.open(io.BytesIO(data)).size)
    except Exception:  # noqa: BLE001  any header PIL cannot read is the decoder's to count
        return 1 << 30


class _Corrupt(Exception):
    """The rest of the shard cannot be read: at header offset `start`, in member `name` (None
    where its header is what is damaged)."""

    def __init__(self, start: int, name: str | None = None):
        super().__init__(start, name)
        self.start, self.name = start, name


def _open(path: str):
    return epath.Path(path).open("rb")


class _TarReader:
    """Samples of one tar shard, read sequentially from the byte offset of a sample's first
    header. `position` is the offset of the next sample to be returned (-1: the shard is
    done), so that a reader made at it continues exactly, a damaged member included."""

    def __init__(self, path: str, offset: int, spec: _SampleSpec):
        self._path, self._pos, self._spec = path, int(offset), spec
        self._file = None
        self._peek = None  # (header offset, name, data) of the next sample's first member
        self._error_at = None  # header offset of a damaged member, reported on the next call
        self._done = offset < 0

    @property
    def position(self) -> int:
        if self._peek is not None:
            return self._peek[0]
        if self._error_at is not None:
            return self._error_at
        return -1 if self._done else self._pos

    def _read(self, n: int) -> bytes:
        chunks, left = [], n
        while left:
            chunk = self._file.read(left)
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        data = b"".join(chunks)
        self._pos += len(data)
        return data

    def _member(self):
        """(header offset, name, data) of the next regular file; None at the archive's end."""
        start, long_name, pax = self._pos, None, {}
        while True:
            block = self._read(_BLOCK)
            if not block or block == _ZERO_BLOCK:
                return None
            if len(block) < _BLOCK:
                raise _Corrupt(start)
            try:
                info = tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
                size = int(pax.get("size", info.size)) if info.isreg() else info.size
            except (tarfile.HeaderError, ValueError):
                raise _Corrupt(start) from None
            data = self._read(size)
            if len(data) < size:  # a truncated member
                raise _Corrupt(start, pax.get("path") or long_name or info.name)
            self._read(-size % _BLOCK)  # padding; missing only where the archive was cut after it
            if info.type == tarfile.XHDTYPE:  # pax: attributes of the next member
                pax.update(_pax_records(data))
            elif info.type == tarfile.GNUTYPE_LONGNAME:
                long_name = data.rstrip(b"\0").decode("utf-8", "surrogateescape")
            elif info.isreg():
                return start, pax.get("path") or long_name or info.name, data
            else:  # a folder, link or global header: no sample starts here
                if info.type != tarfile.XGLTYPE and info.type != tarfile.GNUTYPE_LONGLINK:
                    start, long_name, pax = self._pos, None, {}

    def next(self):
        """The next sample's record; None once the shard is done. A damaged member ends the
        shard with one {"error": "corrupt_shard"}, for the sample it belongs to."""
        if self._error_at is not None:
            self._error_at = None
            return {"error": "corrupt_shard"}
        if self._done:
            return None
        try:
            if self._file is None:
                self._file = _open(self._path)
                if self._pos:
                    self._file.seek(self._pos)
            first, self._peek = self._peek or self._member(), None
        except (_Corrupt, OSError, ValueError):
            self._done = True
            return {"error": "corrupt_shard"}
        if first is None:
            self._done = True
            return None
        key, ext = _split_name(first[1])
        members = {ext: first[2]}
        try:
            while (member := self._member()) is not None:
                if _split_name(member[1])[0] != key:
                    self._peek = member  # the next sample's first member
                    break
                members[_split_name(member[1])[1]] = member[2]
            else:
                self._done = True
        except _Corrupt as e:
            self._done = True
            if e.name is None or _split_name(e.name)[0] == key:
                return {"error": "corrupt_shard"}
            self._error_at = e.start  # this sample is whole; the damaged next one is reported next
        except (OSError, ValueError):
            self._done = True
            return {"error": "corrupt_shard"}
        return self._spec.tar_record(members)

    def close(self):
        if self._file is not None:
            self._file.close()
            self._file = None


def _split_name(name: str) -> tuple[str, str]:
    """WebDataset's (key, extension): the name up to the first "." of its base name."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def _pax_records(data: bytes) -> dict[str, str]:
    """'LEN key=value\\n' records of a pax header."""
    out, at = {}, 0
    while at < len(data):
        space = data.index(b" ", at)
        length = int(data[at:space])
        key, _, value = data[space + 1:at + length - 1].partition(b"=")
        out[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        at += length
    return out


class _ParquetReader:
    """Rows of one Parquet file from a row index, a few at a time (a row group of images can be
    hundreds of MB). `position` is the row of the next sample to be returned (-1: done)."""

    BATCH_ROWS = 64

    def __init__(self, path: str, row: int, spec: _SampleSpec):
        self._path, self._row, self._spec = path, int(row), spec
        self._file = self._batches = None
        self._rows = collections.deque()
        self._done = row < 0

    @property
    def position(self) -> int:
        return -1 if self._done else self._row

    def _start(self):
        import pyarrow.parquet as pq

        self._file = _open(self._path)
        parquet = pq.ParquetFile(self._file)
        image, caption = parquet_columns(parquet.schema_arrow.names, self._spec)
        if image is None:
            raise _Corrupt
        sizes = [parquet.metadata.row_group(g).num_rows for g in range(parquet.num_row_groups)]
        starts = np.cumsum([0] + sizes)
        group = int(np.searchsorted(starts, self._row, side="right")) - 1
        if group >= len(sizes):
            self._batches = iter(())
            return
        self._skip = self._row - int(starts[group])  # rows of that group before the position
        columns = [image] + ([caption] if caption else [])
        self._batches = parquet.iter_batches(batch_size=self.BATCH_ROWS, columns=columns,
                                             row_groups=list(range(group, len(sizes))))

    def next(self):
        if self._done:
            return None
        try:
            if self._batches is None:
                self._start()
            while not self._rows:
                batch = next(self._batches, None)
                if batch is None:
                    self._done = True
                    return None
                images = batch.column(0).to_pylist()
                captions = batch.column(1).to_pylist() if batch.num_columns > 1 else [None] * len(images)
                rows = list(zip(images, captions))[self._skip:]
                self._skip -= min(self._skip, len(images))
                self._rows.extend(rows)
        except Exception:  # noqa: BLE001  pyarrow raises its own errors for damaged files
            self._done = True
            return {"error": "corrupt_shard"}
        image, caption = self._rows.popleft()
        self._row += 1
        return self._spec.record(image, caption)

    def close(self):
        if self._file is not None:
            self._file.close()
            self._file = None


def parquet_columns(names, spec: _SampleSpec) -> tuple[str | None, str | None]:
    """(image column, caption column) of a Parquet schema: the first of data.shard_image_key
    present, and data.shard_caption_key (None where absent)."""
    lower = {n.lower(): n for n in names}
    image = next((lower[k] for k in spec.image_keys if k in lower), None)
    return image, spec.caption_key if spec.caption_key in names else None


# ---------------------------------------------------------------------------------------------
# The source and its Grain dataset.

class ShardSource:
    """The shards of data.image_source "webdataset" / "parquet": the shard list, how to read a
    sample, and (dataset) the Grain stream of (identity, record) for one host."""

    def __init__(self, fmt: str, shards, *, image_key: str, caption_key: str,
                 min_image_size: int = 0, cycle_length: int = 4):
        assert fmt in FORMATS, fmt
        self.format = fmt
        self.paths = resolve_shards(shards)
        self.spec = _SampleSpec(image_key, caption_key, min_image_size)
        self.cycle_length = cycle_length
        # Saved with the state: a state is only valid for the same shard list in the same order.
        self.fingerprint = zlib.crc32("\n".join(self.paths).encode())
        if fmt == "parquet":
            self._check_columns(shards, image_key, caption_key)

    def _check_columns(self, shards, image_key, caption_key, tries: int = 3):
        """Column names are a configuration matter: checked at start on the schema of the
        first shard that reads (a damaged shard is skipped at run time, as corrupt_shard)."""
        import pyarrow.parquet as pq

        for path in self.paths[:tries]:
            try:
                with _open(path) as f:
                    names = pq.ParquetFile(f).schema_arrow.names
                break
            except Exception as e:  # noqa: BLE001  pyarrow's errors for a damaged file
                problem = f"{path} is not a readable Parquet file ({e})"
        else:
            raise ValueError(f"data.shards = {shards!r}: {problem}; expected img2dataset's "
                             ".parquet output") from None
        image, caption = parquet_columns(names, self.spec)
        if image is None:
            raise ValueError(f"data.shard_image_key = {image_key!r}: no such column in "
                             f"{path} (columns {names}); expected the image bytes column")
        if caption is None:
            raise ValueError(f"data.shard_caption_key = {caption_key!r}: no such column in "
                             f"{path} (columns {names}); expected the caption column")

    def __len__(self):
        raise TypeError("a shard source has no length: its samples are not indexed up front")

    def reader(self, shard: int, position: int = 0):
        cls = _TarReader if self.format == "webdataset" else _ParquetReader
        return cls(self.paths[shard], position, self.spec)

    def shard_records(self, shard: int):
        """The records of one shard in file order (precompute, tokenizer texts)."""
        reader = self.reader(shard)
        try:
            while (record := reader.next()) is not None:
                yield record
        finally:
            reader.close()

    def records(self):
        """Every record, shard after shard in list order: the source's deterministic order."""
        for shard in range(len(self.paths)):
            yield from self.shard_records(shard)

    def dataset(self, *, seed: int, num_epochs: int, shard_index: int, shard_count: int,
                worker_count: int = 0, shuffle: bool = True) -> "ShardIterDataset":
        workers = max(1, worker_count)
        if len(self.paths) < shard_count * workers:
            raise ValueError(
                f"data.shards: {len(self.paths)} shard files cannot be split over {shard_count} "
                f"hosts x {workers} workers (data.worker_count); expected at least "
                f"{shard_count * workers} shards, or fewer workers")
        return ShardIterDataset(self, seed=seed, num_epochs=num_epochs, shard_index=shard_index,
                                shard_count=shard_count, shuffle=shuffle)


def epoch_shards(num_shards: int, *, seed: int, epoch: int, shard_index: int, shard_count: int,
                 worker: tuple[int, int] = (0, 1), shuffle: bool = True) -> list[int]:
    """The shards one worker of one host reads in an epoch, in order: a permutation seeded by
    (seed, epoch), dealt round-robin to hosts, then to that host's workers."""
    order = (np.random.default_rng([seed, epoch]).permutation(num_shards) if shuffle
             else np.arange(num_shards))
    start, step = worker
    return [int(s) for s in order[shard_index::shard_count][start::step]]


class ShardIterDataset(grain.IterDataset):
    """(identity, record) of this host's shards, epoch after epoch; identity is (epoch, shard,
    ordinal of the sample in its shard). Grain's mp_prefetch deals shards to its workers through
    set_slice (the SupportsInPlaceSlicing protocol), as it slices a MapDataset."""

    def __init__(self, source: ShardSource, *, seed: int, num_epochs: int, shard_index: int,
                 shard_count: int, shuffle: bool = True):
        super().__init__()
        self.source, self.seed, self.num_epochs = source, seed, num_epochs
        self.shard_index, self.shard_count, self.shuffle = shard_index, shard_count, shuffle
        self.worker = (0, 1)  # (start, step) within the host's shards

    def set_slice(self, sl: slice, sequential_slice: bool = False) -> None:
        """A worker's share: shards start::step of the host's (slices compose)."""
        if sl.stop is not None:
            raise ValueError(f"a shard stream is sliced by start::step only, not {sl}")
        start, step = self.worker
        self.worker = (start + (sl.start or 0) * step, step * (sl.step or 1))

    def __iter__(self):
        return _ShardIterator(self)

    def __str__(self):
        return (f"ShardIterDataset({self.source.format}, {len(self.source.paths)} shards, "
                f"host {self.shard_index}/{self.shard_count}, worker {self.worker})")


class _ShardIterator(grain.DatasetIterator):

    def __init__(self, ds: ShardIterDataset):
        super().__init__()
        self._ds = ds
        self._epoch, self._next, self._turn = 0, 0, 0
        self._open: list[list[int]] = []  # [shard, position of its next sample, its ordinal]
        self._readers: list = []  # aligned with _open; None until read (after set_state)
        self._order_epoch, self._order = None, []

    def _shards(self) -> list[int]:
        if self._order_epoch != self._epoch:
            ds = self._ds
            self._order = epoch_shards(len(ds.source.paths), seed=ds.seed, epoch=self._epoch,
                                       shard_index=ds.shard_index, shard_count=ds.shard_count,
                                       worker=ds.worker, shuffle=ds.shuffle)
            self._order_epoch = self._epoch
            if not self._order:
                raise ValueError(f"data.shards: none of the {len(ds.source.paths)} shards falls to "
                                 f"this worker ({ds}); expected at least one shard per host and "
                                 "worker")
        return self._order

    def _fill(self) -> None:
        order = self._shards()
        while len(self._open) < self._ds.source.cycle_length and self._next < len(order):
            self._open.append([order[self._next], 0, 0])
            self._readers.append(None)
            self._next += 1

    def __next__(self):
        while True:
            if self._ds.num_epochs and self._epoch >= self._ds.num_epochs:
                raise StopIteration
            self._fill()
            if not self._open:  # the epoch is done
                self._epoch, self._next, self._turn = self._epoch + 1, 0, 0
                continue
            slot = self._turn % len(self._open)
            shard, position, ordinal = self._open[slot]
            if self._readers[slot] is None:
                self._readers[slot] = self._ds.source.reader(shard, position)
            reader = self._readers[slot]
            record = reader.next()
            if record is None:  # the shard is done: the next one in the list takes its turn
                reader.close()
                del self._open[slot], self._readers[slot]
                order = self._shards()
                if self._next < len(order):
                    self._open.insert(slot, [order[self._next], 0, 0])
                    self._readers.insert(slot, None)
                    self._next += 1
                self._turn = slot
                continue
            self._open[slot] = [shard, reader.position, ordinal + 1]
            self._turn = slot + 1
            return (self._epoch, shard, ordinal), record

    def get_state(self) -> dict:
        return {"epoch": self._epoch, "next": self._next, "turn": self._turn,
                "open": [list(o) for o in self._open], "shards": self._ds.source.fingerprint,
                "cycle_length": self._ds.source.cycle_length}

    def set_state(self, state: dict) -> None:
        if state["shards"] != self._ds.source.fingerprint:
            raise ValueError("data.shards: the saved data state was made with another shard list "
                             "(files, or their order); expected the same shards to resume")
        if state["cycle_length"] != self._ds.source.cycle_length:
            raise ValueError(f"data.cycle_length = {self._ds.source.cycle_length}: the saved data "
                             f"state was made with {state['cycle_length']}; expected the same "
                             "to resume")
        self._close_readers()
        self._epoch, self._next, self._turn = state["epoch"], state["next"], state["turn"]
        self._open = [list(o) for o in state["open"]]
        self._readers = [None] * len(self._open)

    def _close_readers(self) -> None:
        for reader in self._readers:
            if reader is not None:
                reader.close()
        self._readers = [None] * len(self._open)

    def close(self) -> None:
        self._close_readers()
        super().close()


# ---------------------------------------------------------------------------------------------
# Records -> documents, in threads, in order.

class DocumentMapIterDataset(grain.IterDataset):
    """builder(record, rng) over a stream of (identity, record), in `num_threads` threads (image
    decode and resize release the GIL), yielded in stream order, up to `buffer_size` ahead. The
    rng of a document is seeded by (seed, *identity): the same document for the same sample
    whatever the hosts, workers or threads. The state is the parent's before the oldest record
    not yet yielded: a restore builds the prefetched documents again."""

    def __init__(self, parent: grain.IterDataset, builder, *, seed: int, num_threads: int,
                 buffer_size: int):
        super().__init__(parent)
        self.builder, self.seed = builder, seed
        self.num_threads, self.buffer_size = max(1, num_threads), max(1, buffer_size)

    def __iter__(self):
        return _DocumentMapIterator(self._parent.__iter__(), self)

    def __str__(self):
        return f"DocumentMapIterDataset(threads={self.num_threads}, buffer={self.buffer_size})"


class _DocumentMapIterator(grain.DatasetIterator):

    def __init__(self, parent: grain.DatasetIterator, ds: DocumentMapIterDataset):
        super().__init__(parent)
        self._ds = ds
        self._pool = None
        self._pending = collections.deque()  # (parent state before the record, future)
        self._exhausted = False

    def _build(self, identity, record):
        return self._ds.builder(record, np.random.default_rng([self._ds.seed, *identity]))

    def _fill(self) -> None:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self._ds.num_threads)
        while len(self._pending) < self._ds.buffer_size and not self._exhausted:
            state = self._parent.get_state()
            try:
                identity, record = next(self._parent)
            except StopIteration:
                self._exhausted = True
                break
            self._pending.append((state, self._pool.submit(self._build, identity, record)))

    def __next__(self):
        self._fill()
        if not self._pending:
            raise StopIteration
        _, future = self._pending.popleft()
        return future.result()

    def get_state(self) -> dict:
        return self._pending[0][0] if self._pending else self._parent.get_state()

    def set_state(self, state: dict) -> None:
        for _, future in self._pending:
            future.cancel()
        self._pending.clear()
        self._exhausted = False
        self._parent.set_state(state)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
        super().close()
