"""img2dataset shards (issue 15): WebDataset tar and Parquet sources written here in
img2dataset's layout, corrupt samples included; exact resume mid-shard through the pipeline,
host and worker splits disjoint and complete, bad samples counted, config errors naming the
field, precompute over shards lining up with the source."""
import io
import json
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from test_data_contract import check_batch
from transfusion_jax.data import latent_records
from transfusion_jax.data.config import get_data_config
from transfusion_jax.data.documents import load_image
from transfusion_jax.data.pipeline import make_pipeline
from transfusion_jax.data.shapes import text as shapes_text
from transfusion_jax.data.shards import ShardSource, resolve_shards
from transfusion_jax.data.tokenizer import train_tokenizer

PER_SHARD = 6


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(shapes_text.text_corpus(0, "train", 1000), 512)


def jpeg(value: int, size: int = 16) -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), value % 256, np.uint8)).save(out, "JPEG")
    return out.getvalue()


def write_tar(path, samples, truncate: bool = False):
    """img2dataset's layout: per sample KEY.jpg, KEY.txt, KEY.json, consecutive; `truncate`:
    the file ends half-way through the last member's data."""
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    if truncate:
        with tarfile.open(path) as tar:
            last = tar.getmembers()[-1]
        path.write_bytes(path.read_bytes()[:last.offset_data + last.size // 2])


def sample(n: int, caption: str | None = None) -> dict:
    caption = f"picture {n}" if caption is None else caption
    return {"jpg": jpeg(n), "txt": caption.encode(),
            "json": json.dumps({"caption": caption, "key": f"{n:09d}"}).encode()}


def good_tars(folder, shards: int, per_shard: int = PER_SHARD):
    """`shards` tars of good samples, captions 'picture N', N numbering samples in list order."""
    folder.mkdir(exist_ok=True)
    for s in range(shards):
        write_tar(folder / f"{s:05d}.tar",
                  [(f"{s:05d}{i:04d}", sample(s * per_shard + i)) for i in range(per_shard)])
    return str(folder / "*.tar")


def bad_tar(folder):
    """One shard of good and bad samples: counts by reason are known."""
    folder.mkdir(exist_ok=True)
    samples = [
        ("a0", sample(100)),
        ("a1", {"jpg": b"not a jpeg at all", "txt": b"picture 101"}),  # corrupt_image
        ("a2", {"jpg": jpeg(102)}),  # no caption: empty_caption
        ("a3", {"txt": b"picture 103"}),  # no image: missing_image
        ("a4", {"jpg": jpeg(104, size=4), "txt": b"picture 104"}),  # under min_image_size
        ("a5", {"jpg": jpeg(105), "json": json.dumps({"caption": "picture 105"}).encode()}),
        ("a6", {"jpg": jpeg(106), "txt": b"picture 106"}),  # whole, though the next is not
        ("a7", {"jpg": jpeg(107) * 4, "txt": b"picture 107"}),  # cut in its .txt: corrupt_shard
        ("a8", {"jpg": jpeg(108) * 4}),  # cut (the file ends in a7's caption): not there
    ]
    write_tar(folder / "bad.tar", samples[:-1], truncate=True)
    write_tar(folder / "cut.tar", samples[6:], truncate=True)  # cut in the look-ahead's member
    return str(folder / "bad.tar")


def write_parquet(path, rows, row_group_size=4):
    table = pa.table({"key": [f"{i:05d}" for i in range(len(rows))],
                      "jpg": [r[0] for r in rows], "caption": [r[1] for r in rows]})
    pq.write_table(table, path, row_group_size=row_group_size)


def good_parquets(folder, shards: int, per_shard: int = PER_SHARD):
    folder.mkdir(exist_ok=True)
    for s in range(shards):
        n = [s * per_shard + i for i in range(per_shard)]
        write_parquet(folder / f"{s:05d}.parquet", [(jpeg(i), f"picture {i}") for i in n])
    return str(folder / "*.parquet")


def captions(records):
    return [r.get("caption") if isinstance(r.get("caption"), str) else r["caption"].decode()
            for r in records]


def small(**kw):
    return get_data_config(**{**dict(seq_len=64, batch_size=2, image_size=8, read_threads=2,
                                     text_source="none", p_uncond=0.0), **kw})


def same(a, b):
    return all(set(x) == set(y) and all(np.array_equal(x[k], y[k]) for k in x) for x, y in zip(a, b))


# ------------------------------------------------------------------------------- the readers

def test_tar_and_parquet_read_in_file_order_with_bad_samples_as_errors(tmp_path):
    tars = ShardSource("webdataset", good_tars(tmp_path / "t", 2), image_key="jpg",
                       caption_key="caption")
    assert captions(tars.records()) == [f"picture {i}" for i in range(2 * PER_SHARD)]
    parquets = ShardSource("parquet", good_parquets(tmp_path / "p", 2), image_key="jpg",
                           caption_key="caption")
    assert captions(parquets.records()) == [f"picture {i}" for i in range(2 * PER_SHARD)]
    records = list(ShardSource("webdataset", bad_tar(tmp_path / "b"), image_key="jpg;png",
                               caption_key="caption", min_image_size=8).records())
    kinds = [r.get("error") or r.get("caption") for r in records]
    assert kinds == ["picture 100", b"picture 101", None, "missing_image", "small_image",
                     "picture 105", b"picture 106", "corrupt_shard"]
    # a7 whole, a8's .jpg cut: the sample before the damaged member still comes out.
    cut = ShardSource("webdataset", str(tmp_path / "b" / "cut.tar"), image_key="jpg",
                      caption_key="caption")
    assert [r.get("error") or r.get("caption") for r in cut.records()] == [
        b"picture 106", b"picture 107", "corrupt_shard"]
    assert records[1]["image"] == b"not a jpeg at all"  # the builder finds it corrupt


def test_parquet_bad_rows_and_a_damaged_file_are_counted(tmp_path, tok):
    folder = tmp_path / "p"
    good_parquets(folder, 1)
    write_parquet(folder / "bad.parquet", [(jpeg(200), "picture 200"), (None, "picture 201"),
                                           (jpeg(202), None), (b"\xff\xd8 broken", "picture 203"),
                                           (jpeg(204, size=4), "picture 204")], row_group_size=2)
    data = (folder / "00000.parquet").read_bytes()
    (folder / "cut.parquet").write_bytes(data[:len(data) // 2])  # no footer
    shards = ",".join(str(folder / f) for f in ("00000.parquet", "bad.parquet", "cut.parquet"))
    c = small(image_source="parquet", shards=shards, num_epochs=1, batch_size=1,
              min_image_size=8)
    p = make_pipeline(c, patches_per_image=4, tokenizer=tok, shard_index=0, shard_count=1)
    assert sorted(_document_ids(tok, list(p))) == list(range(PER_SHARD)) + [200]
    m = p.metrics()
    assert {k: m[f"skipped_{k}"] for k in ("missing_image", "empty_caption", "corrupt_image",
                                           "small_image", "corrupt_shard")} == dict.fromkeys(
        ("missing_image", "empty_caption", "corrupt_image", "small_image", "corrupt_shard"), 1)
    with pytest.raises(ValueError, match=r"data\.shards = .*cut\.parquet is not a readable"):
        ShardSource("parquet", str(folder / "cut.parquet"), image_key="jpg", caption_key="caption")


def test_resolve_shards_globs_lists_and_ranges(tmp_path):
    pattern = good_tars(tmp_path / "t", 3)
    paths = resolve_shards(pattern)
    assert [p.rsplit("/", 1)[1] for p in paths] == ["00000.tar", "00001.tar", "00002.tar"]
    assert resolve_shards(str(tmp_path / "t" / "{00001..00002}.tar")) == paths[1:]
    assert resolve_shards(f"{paths[2]}, {paths[0]}") == [paths[2], paths[0]]  # order given
    assert resolve_shards([paths[1], paths[1]]) == [paths[1]]
    with pytest.raises(ValueError, match=r"data\.shards = .*nothing.*: no shard files match"):
        resolve_shards(str(tmp_path / "nothing" / "*.tar"))


def test_gs_globs_list_the_bucket_prefix_through_epath(monkeypatch):
    """gs:// goes through etils.epath as the checkpoints do: the folder before the first
    wildcard is listed; plain gs:// paths are taken as given (no listing, no stat)."""
    from transfusion_jax.data import shards
    listed = []

    class FakePath:
        def __init__(self, base):
            self.base = base

        def glob(self, pattern):
            listed.append((self.base, pattern))
            return [f"{self.base}/b.tar", f"{self.base}/a.tar"]

    monkeypatch.setattr(shards.epath, "Path", FakePath)
    assert resolve_shards("gs://bucket/cc12m/*.tar") == ["gs://bucket/cc12m/a.tar",
                                                         "gs://bucket/cc12m/b.tar"]
    assert listed == [("gs://bucket/cc12m", "*.tar")]
    assert resolve_shards("gs://b/x/{08..10}.tar") == [f"gs://b/x/{i:02d}.tar" for i in (8, 9, 10)]


def _epoch(source, seed, hosts, workers=1, epoch_records=None):
    """Sample ids each (host, worker) reads in one epoch (num_epochs=1)."""
    seen = {}
    for host in range(hosts):
        for worker in range(workers):
            ds = source.dataset(seed=seed, num_epochs=1, shard_index=host, shard_count=hosts,
                                worker_count=workers)
            if workers > 1:
                ds.set_slice(slice(worker, None, workers))  # what grain's mp_prefetch does
            seen[host, worker] = [int(c.split()[1]) for c in captions(r for _, r in ds)]
    return seen


@pytest.mark.parametrize("fmt", ["webdataset", "parquet"])
def test_hosts_and_workers_split_each_epoch_disjointly_and_completely(tmp_path, fmt):
    pattern = (good_tars if fmt == "webdataset" else good_parquets)(tmp_path / "s", 7)
    source = ShardSource(fmt, pattern, image_key="jpg", caption_key="caption", cycle_length=2)
    everything = list(range(7 * PER_SHARD))
    for hosts, workers in ((1, 1), (2, 1), (3, 1), (2, 2), (1, 3)):
        seen = _epoch(source, 5, hosts, workers)
        flat = [i for ids in seen.values() for i in ids]
        assert sorted(flat) == everything, (hosts, workers)  # each sample exactly once
        assert all(ids for ids in seen.values())
    # Another seed deals the shards differently; two open shards interleave within a worker.
    one = _epoch(source, 5, 1)[0, 0]
    assert one != _epoch(source, 6, 1)[0, 0]
    assert one[0] // PER_SHARD != one[1] // PER_SHARD
    with pytest.raises(ValueError, match=r"data\.shards: 7 shard files .* 4 hosts x 2 workers"):
        source.dataset(seed=0, num_epochs=1, shard_index=0, shard_count=4, worker_count=2)


def _seen(identity, record):
    return identity, record.get("error") or record.get("caption")


def _walk(ds):
    """(the state before each element and at the end, the elements) of one pass."""
    it, states, seen = iter(ds), [], []
    while True:
        states.append(it.get_state())
        try:
            seen.append(_seen(*next(it)))
        except StopIteration:
            return states, seen


def _resumed(ds, state):
    it = iter(ds)
    it.set_state(json.loads(json.dumps(state)))  # as the checkpoint stores it
    return [_seen(*element) for element in it]


def test_every_state_resumes_exactly_around_damaged_shards(tmp_path):
    """A damaged member is reported once, whether the run is restored before or after it."""
    bad = bad_tar(tmp_path / "b")
    source = ShardSource("webdataset", f"{bad},{tmp_path / 'b' / 'cut.tar'}", image_key="jpg",
                         caption_key="caption", min_image_size=8, cycle_length=2)
    ds = source.dataset(seed=0, num_epochs=1, shard_index=0, shard_count=1)
    states, seen = _walk(ds)
    assert [s for _, s in seen].count("corrupt_shard") == 2 and len(seen) == 8 + 3
    for k in range(len(states)):
        assert _resumed(ds, states[k]) == seen[k:], k


@pytest.mark.parametrize("fmt", ["webdataset", "parquet"])
def test_every_state_resumes_exactly_without_rereading_the_shard(tmp_path, fmt):
    pattern = (good_tars if fmt == "webdataset" else good_parquets)(tmp_path / "s", 3)
    source = ShardSource(fmt, pattern, image_key="jpg", caption_key="caption", cycle_length=2)
    ds = source.dataset(seed=1, num_epochs=2, shard_index=0, shard_count=1)
    states, ids = _walk(ds)
    assert len(ids) == 2 * 3 * PER_SHARD and {i[0][0] for i in ids} == {0, 1}  # two epochs
    for k in (1, 4, 7, 13, 25):  # mid-shard: open shards at a byte offset / row > 0
        assert any(position > 0 for _, position, _ in states[k]["open"]), states[k]
        assert _resumed(ds, states[k]) == ids[k:], k
    other = ShardSource(fmt, pattern.replace("*", "0000[01]"), image_key="jpg",
                        caption_key="caption")
    with pytest.raises(ValueError, match=r"data\.shards: .*another shard list"):
        iter(other.dataset(seed=1, num_epochs=2, shard_index=0, shard_count=1)).set_state(states[3])
    wider = ShardSource(fmt, pattern, image_key="jpg", caption_key="caption", cycle_length=3)
    with pytest.raises(ValueError, match=r"data\.cycle_length = 3: .* made with 2"):
        iter(wider.dataset(seed=1, num_epochs=2, shard_index=0, shard_count=1)).set_state(states[3])


def test_a_restored_tar_is_read_from_its_offset_not_its_start(tmp_path, monkeypatch):
    from transfusion_jax.data import shards
    source = ShardSource("webdataset", good_tars(tmp_path / "t", 2), image_key="jpg",
                         caption_key="caption", cycle_length=2)
    ds = source.dataset(seed=0, num_epochs=1, shard_index=0, shard_count=1)
    states, seen = _walk(ds)
    read = []

    class Counting(io.FileIO):
        def read(self, n=-1):
            data = super().read(n)
            read.append(len(data))
            return data

    monkeypatch.setattr(shards, "_open", lambda path: Counting(path))
    k = 2 * (PER_SHARD - 1)  # one sample left in each of the two open shards
    assert _resumed(ds, states[k]) == seen[k:]
    size = sum((tmp_path / "t" / f"0000{i}.tar").stat().st_size for i in range(2))
    assert sum(read) < size / 4  # the last sample of each and the end blocks only


# ------------------------------------------------------------------------------- the pipeline

@pytest.mark.parametrize("fmt", ["webdataset", "parquet"])
def test_pipeline_resumes_mid_shard_with_the_same_batches(tmp_path, tok, fmt):
    pattern = (good_tars if fmt == "webdataset" else good_parquets)(tmp_path / "s", 4)
    c = small(image_source=fmt, shards=pattern, cycle_length=2, text_source="shapes",
              shapes_num_documents=200, seq_len=48, p_uncond=0.2)
    p = make_pipeline(c, patches_per_image=4, tokenizer=tok, shard_index=0, shard_count=1)
    [next(p) for _ in range(3)]
    state = p.get_state()
    grain_state = json.dumps(json.loads(state)["grain"])
    assert '"open": [[' in grain_state  # shards open mid-way
    expected = [next(p) for _ in range(4)]
    for batch in expected:
        check_batch(batch, B=2, L=48, M=p.max_images, P=4, S=8)
    q = make_pipeline(c, patches_per_image=4, tokenizer=tok, shard_index=0, shard_count=1)
    q.set_state(state)
    assert same([next(q) for _ in range(4)], expected)
    r = make_pipeline(c, patches_per_image=4, tokenizer=tok, shard_index=0, shard_count=1)
    s = make_pipeline(c, patches_per_image=4, tokenizer=tok, shard_index=0, shard_count=1)
    assert same([next(r) for _ in range(3)], [next(s) for _ in range(3)])


def _document_ids(tok, batches):
    ids = []
    for batch in batches:
        for b in range(batch["tokens"].shape[0]):
            seg = batch["segment_ids"][b]
            for s in range(1, seg.max() + 1):
                words = tok.decode(batch["tokens"][b][seg == s]).split()
                ids.append(int(words[1]))
    return ids


def test_pipeline_hosts_read_every_sample_once(tmp_path, tok):
    c = small(image_source="webdataset", shards=good_tars(tmp_path / "t", 5), num_epochs=1,
              batch_size=2)
    seen = []
    for host in range(2):
        p = make_pipeline(c, patches_per_image=4, tokenizer=tok, shard_index=host, shard_count=2)
        seen += _document_ids(tok, list(p))
    assert sorted(seen) == list(range(5 * PER_SHARD))


def test_grain_workers_split_the_shards(tmp_path, tok):
    """Grain's mp_prefetch slices the stream in each worker process (ShardIterDataset.set_slice):
    two workers read every sample once (one row a batch: no worker drops a remainder)."""
    c = small(image_source="webdataset", shards=good_tars(tmp_path / "t", 5), num_epochs=1,
              batch_size=1, worker_count=2)
    p = make_pipeline(c, patches_per_image=4, tokenizer=tok, shard_index=0, shard_count=1)
    assert sorted(_document_ids(tok, list(p))) == list(range(5 * PER_SHARD))
    p.close()


def test_bad_samples_are_counted_never_fatal(tmp_path, tok):
    c = small(image_source="webdataset", shards=bad_tar(tmp_path / "b") + "," +
              good_tars(tmp_path / "t", 1), num_epochs=1, batch_size=1, min_image_size=8)
    p = make_pipeline(c, patches_per_image=4, tokenizer=tok, shard_index=0, shard_count=1)
    ids = _document_ids(tok, list(p))
    m = p.metrics()
    assert sorted(ids) == list(range(PER_SHARD)) + [100, 105, 106]
    assert {k: m[f"skipped_{k}"] for k in ("corrupt_image", "empty_caption", "missing_image",
                                           "small_image", "corrupt_shard")} == dict.fromkeys(
        ("corrupt_image", "empty_caption", "missing_image", "small_image", "corrupt_shard"), 1)
    assert m["skipped"] == 5


def test_config_errors_name_the_field(tmp_path, tok):
    with pytest.raises(ValueError, match=r"data\.shards = '': expected paths or globs"):
        get_data_config(image_source="webdataset")
    with pytest.raises(ValueError, match=r"data\.cycle_length = 0: expected an integer >= 1"):
        get_data_config(cycle_length=0)
    with pytest.raises(ValueError, match=r"data\.min_image_size = -1"):
        get_data_config(min_image_size=-1)
    with pytest.raises(ValueError, match=r"data\.shards = .*: no shard files match"):
        make_pipeline(small(image_source="webdataset", shards=str(tmp_path / "*.tar")),
                      patches_per_image=4, tokenizer=tok, shard_index=0, shard_count=1)
    pattern = good_parquets(tmp_path / "p", 1)
    with pytest.raises(ValueError, match=r"data\.shard_image_key = 'png': no such column"):
        make_pipeline(small(image_source="parquet", shards=pattern, shard_image_key="png"),
                      patches_per_image=4, tokenizer=tok, shard_index=0, shard_count=1)
    with pytest.raises(ValueError, match=r"data\.shard_caption_key = 'text': no such column"):
        make_pipeline(small(image_source="parquet", shards=pattern, shard_caption_key="text"),
                      patches_per_image=4, tokenizer=tok, shard_index=0, shard_count=1)
    with pytest.raises(ValueError, match=r"data\.shards: 1 shard files cannot be split over 2 hosts"):
        make_pipeline(small(image_source="parquet", shards=pattern), patches_per_image=4,
                      tokenizer=tok, shard_index=0, shard_count=2)


# ------------------------------------------------------------------------------- precompute

def test_precompute_encodes_shards_in_the_source_order(tmp_path, monkeypatch):
    """Record i of the latents folder (read back by LatentsSource) is record i of
    source.records(), bad samples included; latents shard k is source shard k. A fake encoder
    (2x2 average pooling) stands in for the VAE."""
    import jax
    import ml_collections

    from transfusion_jax import precompute
    from transfusion_jax.data.sources import build_image_source

    data = small(image_source="webdataset", image_size=8,
                 shards=good_tars(tmp_path / "t", 2) + "," + bad_tar(tmp_path / "b"))
    encoder = precompute.Encoder(
        "vae", jax.jit(lambda v, x: x.reshape(x.shape[0], 4, 2, 4, 2, 3).mean((2, 4))),
        None, (4, 4, 3), {})
    monkeypatch.setattr(precompute, "load_encoder", lambda *args: encoder)
    out = str(tmp_path / "latents")
    manifest = precompute.precompute(ml_collections.ConfigDict({"data": data}), out,
                                     autoencoder="fake", batch_size=4)
    assert [s["num_records"] for s in manifest["shards"]] == [PER_SHARD, PER_SHARD, 8]
    assert manifest["num_failed_images"] == 1  # the undecodable .jpg; other bad samples: errors
    records = list(build_image_source(data).records())
    stored = latent_records.LatentsSource(out)
    assert len(stored) == len(records) == manifest["num_records"]
    for i, want in enumerate(records):
        got = stored[i]
        if "error" in want:
            assert got == want
        elif want["image"] == b"not a jpeg at all":
            assert got["image"] == {"error": "corrupt_image"}
        else:
            assert got["caption"] == want["caption"]
            pooled = load_image(want["image"], 8).reshape(4, 2, 4, 2, 3).mean((1, 3))
            np.testing.assert_allclose(got["image"], pooled, atol=1e-6)
