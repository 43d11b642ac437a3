"""Sources (shapes, TFDS, COCO, local files) and records -> documents, bad input included."""
import json

import numpy as np
import pytest
from PIL import Image

from transfusion_jax.data import counters
from transfusion_jax.data.shapes import text as shapes_text
from transfusion_jax.data.config import get_data_config
from transfusion_jax.data.documents import DocumentBuilder, load_image
from transfusion_jax.data.pipeline import make_pipeline
from transfusion_jax.data.sources import CocoKarpathySource, ImageFilesSource, TextFilesSource, TfdsTextSource, build_sources, sample_texts
from transfusion_jax.data.tokenizer import train_tokenizer

P, S = 4, 16


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(shapes_text.text_corpus(0, "train", 1000), 512)


def builder(tok, **kw):
    args = dict(patches_per_image=P, image_size=S, caption_first_prob=0.8, p_uncond=0.1,
                num_timesteps=1000)
    return DocumentBuilder(tok, **{**args, **kw})


def skipped(doc):
    c = counters.as_dict(doc["counts"])
    assert len(doc["tokens"]) == 0 and c["skipped"] == 1
    return [k[len("skipped_"):] for k, v in c.items() if k.startswith("skipped_") and v][0]


def test_documents_of_each_kind(tok):
    rng = np.random.default_rng(0)
    image = np.full((20, 30, 3), 200, np.uint8)
    b = builder(tok, p_uncond=0.0, caption_first_prob=1.0)
    doc = b({"image": image, "caption": "a red circle"}, rng)
    want = [1] + tok.encode("a red circle") + [3] + [0] * P + [4, 2]
    assert doc["tokens"].tolist() == want and doc["boi"].tolist() == [want.index(3)]
    assert doc["max_timestep"].tolist() == [1000] and doc["images"].shape == (1, S, S, 3)
    doc = builder(tok, p_uncond=0.0, caption_first_prob=0.0)({"image": image, "caption": "x"}, rng)
    assert doc["tokens"][:2].tolist() == [1, 3] and doc["max_timestep"].tolist() == [500]
    doc = builder(tok, p_uncond=1.0)({"image": image, "caption": "x"}, rng)
    assert doc["tokens"].tolist() == [1, 3] + [0] * P + [4, 2]  # caption dropped: unconditional
    assert doc["max_timestep"].tolist() == [1000]
    doc = b({"parts": [{"text": "hi"}, {"image": image}, {"text": "q a"}, {"image": image}]}, rng)
    assert doc["max_timestep"].tolist() == [500, 1000]  # noise-limited when text follows
    assert len(doc["boi"]) == 2 and doc["tokens"][0] == 1 and doc["tokens"][-1] == 2
    doc = b({"text": b"bytes are fine"}, rng)
    assert tok.decode(doc["tokens"]) == "bytes are fine"


def test_noise_limit_switch(tok):
    """data.noise_limit (paper Table 8): on (the paper's), an image that text follows draws
    t < T/2; off, every image draws from the whole [0, T). Through the pipeline too."""
    rng = np.random.default_rng(0)
    image = np.full((20, 30, 3), 200, np.uint8)
    parts = {"parts": [{"text": "hi"}, {"image": image}, {"text": "q a"}, {"image": image}]}
    for limit, limited in ((True, 500), (False, 1000)):
        image_first = builder(tok, p_uncond=0.0, caption_first_prob=0.0, noise_limit=limit)
        assert image_first({"image": image, "caption": "x"}, rng)["max_timestep"].tolist() == [
            limited]
        assert image_first(parts, rng)["max_timestep"].tolist() == [limited, 1000]
        caption_first = builder(tok, p_uncond=0.0, caption_first_prob=1.0, noise_limit=limit)
        assert caption_first({"image": image, "caption": "x"}, rng)["max_timestep"].tolist() == [
            1000]
        config = get_data_config(seq_len=256, batch_size=2, image_size=S, read_threads=1,
                                 caption_first_prob=0.0, p_uncond=0.0, noise_limit=limit)
        batch = next(make_pipeline(config, patches_per_image=P, tokenizer=tok))
        used = batch["max_timestep"][batch["image_mask"]]
        assert used.size and (limited in used) and set(used.tolist()) <= {limited, 1000}


def test_bad_records_are_counted_by_reason(tok, tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    Image.new("RGB", (40, 40)).save(tmp_path / "ok.png")
    (tmp_path / "truncated.png").write_bytes((tmp_path / "ok.png").read_bytes()[:60])
    b = builder(tok)
    cases = {
        "corrupt_image": [{"image": str(tmp_path / "corrupt.png"), "caption": "x"},
                          {"image": str(tmp_path / "truncated.png"), "caption": "x"},
                          {"image": b"garbage", "caption": "x"}],
        "missing_image": [{"image": str(tmp_path / "nope.png"), "caption": "x"}],
        "bad_image_shape": [{"image": np.zeros((8, 8, 5), np.uint8), "caption": "x"},
                            {"image": np.zeros((0, 8, 3), np.uint8), "caption": "x"},
                            {"image": np.zeros((8,), np.uint8), "caption": "x"},
                            {"image": np.zeros((8, 8, 3), np.float64), "caption": "x"}],
        "empty_caption": [{"image": str(tmp_path / "ok.png"), "caption": "  "},
                          {"image": str(tmp_path / "ok.png")}],
        "empty_text": [{"text": ""}, {"text": " \n"}],
        "invalid_utf8": [{"text": b"caf\xe9"}, {"text": "lone \udc80 surrogate"},
                         {"image": str(tmp_path / "ok.png"), "caption": b"\xff\xfe"}],
        "bad_record": [{"nothing": 1}, "not a dict", {"parts": [{"text": "no images"}]},
                       {"error": "bad_record"}],
    }
    for reason, records in cases.items():
        for record in records:
            assert skipped(b(record, rng)) == reason, record
    assert len(b({"image": str(tmp_path / "ok.png"), "caption": "fine"}, rng)["tokens"]) > 0


def test_load_image_resizes_and_centre_crops(tmp_path):
    # 60 x 20, black but for a white band at columns 15..45: the crop (columns 20..40) is white.
    pixels = np.zeros((20, 60, 3), np.uint8)
    pixels[:, 15:45] = 255
    Image.fromarray(pixels).save(tmp_path / "wide.png")
    out = load_image(str(tmp_path / "wide.png"), 10)
    assert out.shape == (10, 10, 3) and out.dtype == np.float32
    assert np.allclose(out, 1.0, atol=0.02)
    tall = load_image(np.ascontiguousarray(pixels.transpose(1, 0, 2)), 10)
    assert np.allclose(tall, 1.0, atol=0.02)
    grey = load_image(np.full((5, 7), 0, np.uint8), 4)  # greyscale arrays become RGB
    assert grey.shape == (4, 4, 3) and np.allclose(grey, -1.0)
    assert load_image(np.full((3, 3, 4), 255, np.uint8), 3).shape == (3, 3, 3)  # RGBA


def test_tfds_text_source_with_mock_data():
    import tensorflow_datasets as tfds
    with tfds.testing.mock_data(num_examples=7):
        for name in ("c4/en", "wiki40b/en"):
            source = TfdsTextSource(name, split="train", data_dir="", text_key="text")
            assert len(source) == 7
            record = source[3]
            assert isinstance(record["text"], (str, bytes)) and len(record["text"]) > 0
        wrong_key = TfdsTextSource("c4/en", split="train", data_dir="", text_key="body")
        assert wrong_key[0] == {"error": "bad_record"}


def _karpathy(tmp_path):
    images = []
    for i, split in enumerate(["train", "restval", "val", "test", "train"]):
        folder = "train2014" if split in ("train", "restval") else "val2014"
        (tmp_path / folder).mkdir(exist_ok=True)
        Image.fromarray(np.full((30, 40, 3), 10 * i, np.uint8)).save(tmp_path / folder / f"{i}.jpg")
        images.append({"filepath": folder, "filename": f"{i}.jpg", "split": split, "cocoid": i,
                       "sentences": [{"raw": f"caption {i} a"}, {"raw": f"caption {i} b"}]})
    (tmp_path / "dataset_coco.json").write_text(json.dumps({"images": images}))
    return tmp_path / "dataset_coco.json"


def test_coco_karpathy_source(tmp_path, tok):
    source = CocoKarpathySource(str(_karpathy(tmp_path)), image_root=str(tmp_path), splits="train+restval")
    assert len(source) == 3
    assert source[2]["image"].endswith("train2014/4.jpg") and len(source[2]["caption"]) == 2
    doc = builder(tok, p_uncond=0.0)(source[1], np.random.default_rng(0))
    assert doc["images"].shape == (1, S, S, 3) and np.allclose(doc["images"], 10 / 127.5 - 1, atol=0.02)
    assert "caption 1" in tok.decode(doc["tokens"])
    with pytest.raises(ValueError, match="data.coco_split"):
        CocoKarpathySource(str(tmp_path / "dataset_coco.json"), image_root="", splits="nope")


def test_local_files(tmp_path):
    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "imgs" / "a.png")
    (tmp_path / "imgs" / "a.txt").write_text("a caption\n")
    Image.new("RGB", (8, 8)).save(tmp_path / "imgs" / "b.jpg")
    folder = ImageFilesSource(str(tmp_path / "imgs"))
    assert len(folder) == 2 and folder[0]["caption"] == b"a caption" and folder[1]["caption"] == b""
    lines = [json.dumps({"image": "imgs/a.png", "caption": "one"}).encode(), b"{broken",
             b'{"image": "imgs/a.png", "caption": "caf\xe9"}', b"", b'{"caption": "no image"}']
    (tmp_path / "pairs.jsonl").write_bytes(b"\n".join(lines))
    pairs = ImageFilesSource(str(tmp_path / "pairs.jsonl"))
    assert len(pairs) == 4  # the blank line is not a document
    assert pairs[0] == {"image": str(tmp_path / "imgs" / "a.png"), "caption": "one"}
    assert [pairs[i].get("error") for i in (1, 2, 3)] == ["bad_record", "invalid_utf8", "bad_record"]
    (tmp_path / "corpus.txt").write_bytes(b"first doc\n\nsecond doc\r\nthird")
    text = TextFilesSource(str(tmp_path / "corpus.txt"))
    assert [text[i]["text"] for i in range(len(text))] == [b"first doc", b"second doc", b"third"]
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "x.txt").write_text("whole\nfile")
    assert TextFilesSource(str(tmp_path / "docs"))[0] == {"text": b"whole\nfile"}
    (tmp_path / "c.jsonl").write_text('{"text": "j1"}\n{"text": "j2"}\n')
    assert TextFilesSource(str(tmp_path / "c.jsonl"))[1] == {"text": "j2"}
    with pytest.raises(ValueError, match="data.text_files_path"):
        TextFilesSource(str(tmp_path / "missing.txt"))


def test_build_sources_and_tokenizer_texts(tmp_path):
    (tmp_path / "c.txt").write_text("alpha beta\ngamma\n")
    c = get_data_config(text_source="text_files", text_files_path=str(tmp_path / "c.txt"),
                        shapes_num_documents=10)
    text, image = build_sources(c)
    assert len(text) == 2 and len(image) == 10
    texts = sample_texts(c, 4)
    assert texts[:2] == ["alpha beta", "gamma"] and len(texts) == 4
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(ValueError, match="data.text_source"):
        build_sources(get_data_config(text_source="text_files", text_files_path=str(tmp_path / "empty.txt")))
