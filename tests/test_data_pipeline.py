"""The Grain pipeline end to end: contract, determinism, resumption, host shards, mixing ratio,
caption-first rate, bad input, and the start-up check that an image fits a row."""
import json

import numpy as np
import pytest
from PIL import Image

from test_data_contract import check_batch
from transfusion_jax.data.shapes import text as shapes_text
from transfusion_jax.data.config import get_data_config
from transfusion_jax.data.pipeline import make_pipeline
from transfusion_jax.data.tokenizer import train_tokenizer

BOS, EOS, BOI = 1, 2, 3


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(shapes_text.text_corpus(0, "train", 1000), 512)


def small(**kw):
    return get_data_config(**{**dict(seq_len=512, batch_size=4, image_size=16, read_threads=1), **kw})


def take(pipeline, n):
    return [next(pipeline) for _ in range(n)]


def same(a, b):
    return all(set(x) == set(y) and all(np.array_equal(x[k], y[k]) for k in x) for x, y in zip(a, b))


def test_shapes_batches_satisfy_the_contract(tok):
    c = small(image_size=32)
    p = make_pipeline(c, patches_per_image=16, tokenizer=tok, shard_index=0, shard_count=1)
    batches = take(p, 3)
    assert p.max_images == 512 // 18
    for batch in batches:
        check_batch(batch, B=4, L=512, M=p.max_images, P=16, S=32, whole_documents=True)
    m = p.metrics()
    # Only text documents are split (to fill rows: data.pack_split_text), never one with images.
    assert m["rows"] == 12 and 0 < m["documents_split"] <= m["text_documents"]
    assert m["skipped"] == 0
    # Split text fills rows: less padding than whole documents give on the same stream.
    whole = make_pipeline(small(image_size=32, pack_split_text=False), patches_per_image=16,
                          tokenizer=tok, shard_index=0, shard_count=1)
    take(whole, 3)
    assert m["padding"] < 0.8 * whole.metrics()["padding"]
    assert m["pair_documents"] and m["interleaved_documents"] and m["text_documents"]
    assert m["text_tokens"] + m["patches"] + m["padding"] == 12 * 512
    assert m["patches"] == sum(int((b["patch_index"] >= 0).sum()) for b in batches)


def test_fixed_slots_close_rows_early(tok):
    p = make_pipeline(small(max_images=2), patches_per_image=16, tokenizer=tok)
    assert (p.shard_index, p.shard_count) == (0, 1)  # jax.process_index(), jax.process_count()
    for batch in take(p, 2):  # interleaved documents of 3 images are split
        check_batch(batch, B=4, L=512, M=2, P=16, S=16, whole_documents=False)
        assert batch["image_mask"].sum(axis=1).max() <= 2


def test_same_seed_same_batches(tok):
    def run(seed):
        return take(make_pipeline(small(seed=seed), patches_per_image=16, tokenizer=tok,
                                  shard_index=0, shard_count=1), 3)
    assert same(run(3), run(3))
    assert not same(run(3), run(4))


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 2])
def test_restore_state_continues_identically(tok, workers):
    c = small(worker_count=workers)
    k, n = 3, 3
    p = make_pipeline(c, patches_per_image=16, tokenizer=tok, shard_index=0, shard_count=1)
    take(p, k)
    state = p.get_state()
    assert isinstance(state, bytes) and json.loads(state)  # JSON, for the checkpoint
    metrics_at_k = p.metrics()
    expected = take(p, n)
    for batch in expected:
        check_batch(batch, B=4, L=512, M=p.max_images, P=16, S=16)
    p.close()
    q = make_pipeline(c, patches_per_image=16, tokenizer=tok, shard_index=0, shard_count=1)
    q.set_state(state)
    assert q.metrics() == metrics_at_k  # counters are restored with the state
    assert same(take(q, n), expected)
    q.close()
    other = make_pipeline(small(seed=9), patches_per_image=16, tokenizer=tok,
                          shard_index=0, shard_count=1)
    with pytest.raises(ValueError, match="seed = 0.*seed = 9"):
        other.set_state(state)  # a state only continues the pipeline it came from
    other.close()


def _text_corpus(tmp_path, n):
    lines = [f"document {i} " + "red circle " * (i % 7) for i in range(n)]
    (tmp_path / "docs.txt").write_text("\n".join(lines) + "\n")
    return str(tmp_path / "docs.txt")


def _image_pairs(tmp_path, n):
    (tmp_path / "img").mkdir()
    with open(tmp_path / "pairs.jsonl", "w") as f:
        for i in range(n):
            Image.fromarray(np.full((8, 8, 3), i, np.uint8)).save(tmp_path / "img" / f"{i}.png")
            f.write(json.dumps({"image": f"img/{i}.png", "caption": f"picture {i}"}) + "\n")
    return str(tmp_path / "pairs.jsonl")


def _document_ids(tok, batches):
    ids = []
    for batch in batches:
        for b in range(batch["tokens"].shape[0]):
            seg = batch["segment_ids"][b]
            for s in range(1, seg.max() + 1):
                words = tok.decode(batch["tokens"][b][seg == s]).split()
                ids.append((words[0], int(words[1])))
    return ids


def test_host_shards_are_disjoint_and_cover_the_epoch(tok, tmp_path):
    c = small(text_source="text_files", text_files_path=_text_corpus(tmp_path, 41),
              image_source="image_files", image_files_path=_image_pairs(tmp_path, 23),
              num_epochs=1, batch_size=2, p_uncond=0.0, seq_len=64, image_size=8,
              pack_split_text=False)  # whole documents: each segment names its document
    seen = []
    for shard in (0, 1):
        p = make_pipeline(c, patches_per_image=4, tokenizer=tok, shard_index=shard, shard_count=2)
        assert p.batch_size == 1
        seen.append(_document_ids(tok, list(p)))
    for ids in seen:
        assert len(ids) == len(set(ids))
    assert not set(seen[0]) & set(seen[1])
    assert set(seen[0]) | set(seen[1]) == ({("document", i) for i in range(41)}
                                           | {("picture", i) for i in range(23)})


def _segments(batch):
    for b in range(batch["tokens"].shape[0]):
        seg = batch["segment_ids"][b]
        for s in range(1, seg.max() + 1):
            where = np.flatnonzero(seg == s)
            yield (batch["tokens"][b, where], batch["patch_index"][b, where],
                   batch["max_timestep"][b])


@pytest.mark.slow
@pytest.mark.parametrize("ratio", [1.0, 0.5])
def test_text_to_patch_ratio_and_caption_first_rate_over_1000_rows(tok, ratio):
    c = small(batch_size=8, text_to_patch_ratio=ratio)
    p = make_pipeline(c, patches_per_image=16, tokenizer=tok, shard_index=0, shard_count=1)
    text_only = patches = caption_first = image_first = 0
    for batch in take(p, 125):  # 1000 rows
        for tokens, pidx, max_t in _segments(batch):
            n_patches = int((pidx >= 0).sum())
            if n_patches == 0:
                text_only += len(tokens)
                continue
            patches += n_patches
            if n_patches == 16 and len(tokens) > 16 + 4:  # a pair whose caption was kept
                slot = pidx[pidx >= 0][0] // 16
                if tokens[1] == BOI:
                    image_first += 1
                    assert max_t[slot] == 500
                else:
                    caption_first += 1
                    assert max_t[slot] == 1000
    measured = text_only / patches
    rate = caption_first / (caption_first + image_first)
    print(f"ratio target {ratio}: measured {measured:.4f}; caption-first rate {rate:.4f} "
          f"of {caption_first + image_first} pairs")
    assert abs(measured / ratio - 1) < 0.05
    assert abs(rate - 0.8) < 0.02
    m = p.metrics()
    assert m["rows"] == 1000 and m["caption_first"] == caption_first
    assert abs(m["text_to_patch_ratio"] - measured) < 1e-9


def test_bad_input_is_counted_never_fatal(tok, tmp_path):
    (tmp_path / "img").mkdir()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(tmp_path / "img" / "ok.png")
    (tmp_path / "img" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnope")
    lines = [json.dumps({"image": "img/ok.png", "caption": "fine"}).encode(),
             json.dumps({"image": "img/corrupt.png", "caption": "broken"}).encode(),
             json.dumps({"image": "img/missing.png", "caption": "gone"}).encode(),
             json.dumps({"image": "img/ok.png", "caption": ""}).encode(),
             b'{"image": "img/ok.png", "caption": "bad \xff utf8"}',
             b"{not json"]
    (tmp_path / "pairs.jsonl").write_bytes(b"\n".join(lines))
    long_line = "circle " * 200  # ~200 tokens: longer than a row of 64
    (tmp_path / "c.txt").write_bytes(b"ok text\n \nbad \xe9 text\n" + long_line.encode())
    c = small(text_source="text_files", text_files_path=str(tmp_path / "c.txt"),
              image_source="image_files", image_files_path=str(tmp_path / "pairs.jsonl"),
              num_epochs=1, batch_size=1, seq_len=64, image_size=8, p_uncond=0.0)
    p = make_pipeline(c, patches_per_image=4, tokenizer=tok, shard_index=0, shard_count=1)
    batches = list(p)
    for batch in batches:
        check_batch(batch, B=1, L=64, M=64 // 6, P=4, S=8, whole_documents=False)
    m = p.metrics()
    assert {k: m[f"skipped_{k}"] for k in ("corrupt_image", "missing_image", "empty_caption",
                                           "invalid_utf8", "bad_record", "empty_text")} == {
        "corrupt_image": 1, "missing_image": 1, "empty_caption": 1, "invalid_utf8": 2,
        "bad_record": 1, "empty_text": 1}
    assert m["skipped"] == 7 and m["documents"] == 3 and m["documents_split"] == 1
    text = " ".join(tok.decode(b["tokens"][0]) for b in batches)
    assert "fine" in text and "ok text" in text and text.count("circle") == 200


def test_image_that_cannot_fit_a_row_fails_at_start(tok):
    with pytest.raises(ValueError, match=r"patches_per_image \(511\).*data\.seq_len \(512\)"):
        make_pipeline(small(), patches_per_image=511, tokenizer=tok, shard_index=0, shard_count=1)
    with pytest.raises(ValueError, match="data.batch_size"):
        make_pipeline(small(batch_size=3), patches_per_image=16, tokenizer=tok,
                      shard_index=0, shard_count=2)


def test_tfds_text_source_in_the_pipeline(tok):
    import tensorflow_datasets as tfds
    c = small(text_source="tfds", tfds_name="wiki40b/en", image_source="none", num_epochs=1,
              batch_size=1)
    with tfds.testing.mock_data(num_examples=30):
        p = make_pipeline(c, patches_per_image=16, tokenizer=tok, shard_index=0, shard_count=1)
        batches = list(p)
    for batch in batches:
        check_batch(batch, B=1, L=512, M=p.max_images, P=16, S=16, whole_documents=True)
    assert p.metrics()["text_documents"] == 30 and not any(b["image_mask"].any() for b in batches)


def test_a_source_of_only_bad_documents_is_a_config_error(tok, tmp_path, monkeypatch):
    from transfusion_jax.data import packing
    monkeypatch.setattr(packing, "MAX_CONSECUTIVE_SKIPS", 50)
    (tmp_path / "c.txt").write_bytes(b"bad \xe9 utf8\n" * 10)
    c = small(text_source="text_files", text_files_path=str(tmp_path / "c.txt"), image_source="none")
    p = make_pipeline(c, patches_per_image=16, tokenizer=tok, shard_index=0, shard_count=1)
    with pytest.raises(ValueError, match="skipped_invalid_utf8"):
        next(p)
