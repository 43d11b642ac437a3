"""CLIP score (evaluators/clip_score.py, models/clip.py) against `open_clip` (test-only
dependency, extras "parity"): the same network on the same random weights, the same token ids,
the same preprocessed pixels, the same score.

A tiny open_clip CLIP (open_clip.model.CLIP with 2-layer towers of width 64 and 32; CLIP's real
vocabulary and context, 224x224 images in 32x32 patches) is given random weights, saved as
open_clip saves its checkpoints (a torch.save'd state dict, .bin, and .safetensors) and read by
our loader without torch. open_clip imports torchvision; where the package cannot be imported
(PyPI's torchvision does not load beside the CPU torch wheel used here: its C ops), torchvision
is a bare package (no __init__) while open_clip imports, as in tests/test_fid.py.
"""
import importlib
import importlib.metadata
import os
import random
import sys
import types

import jax
import numpy as np
import pytest
from PIL import Image

from transfusion_jax.core.config import load_config
from transfusion_jax.evaluators import clip_score, common, fid
from transfusion_jax.models import clip as jclip
from test_fid import WordTokenizer
from test_generate import random_params

TINY = jclip.ClipConfig(embed_dim=16, image_size=224, patch_size=32, vision_width=64,
                        vision_layers=2, vision_heads=2, text_width=32, text_layers=2, text_heads=2)
TINY_QUICK = jclip.ClipConfig(**{**TINY.__dict__, "quick_gelu": True})


def _torchvision_without_ops():
    """sys.modules["torchvision"] (and torchvision.ops) as bare packages: no C ops."""
    for k in [k for k in sys.modules if k == "torchvision" or k.startswith("torchvision.")]:
        del sys.modules[k]
    root = os.path.dirname(importlib.util.find_spec("torchvision").origin)
    for name, path in (("torchvision", root), ("torchvision.ops", os.path.join(root, "ops"))):
        module = types.ModuleType(name)
        module.__path__ = [path]
        sys.modules[name] = module
    sys.modules["torchvision"].__version__ = importlib.metadata.version("torchvision")
    sys.modules["torchvision"].ops = sys.modules["torchvision.ops"]


@pytest.fixture(scope="module")
def open_clip():
    saved = {k: v for k, v in sys.modules.items()
             if k == "torchvision" or k.startswith("torchvision.")}
    try:
        try:
            importlib.import_module("torchvision.transforms")
            importlib.import_module("torchvision.ops.misc")
        except Exception:  # noqa: BLE001 - any import failure: the package without its C ops
            _torchvision_without_ops()
        import open_clip
    finally:
        for k in [k for k in sys.modules if k == "torchvision" or k.startswith("torchvision.")]:
            del sys.modules[k]
        sys.modules.update(saved)
    return open_clip


@pytest.fixture(scope="module")
def vocab(open_clip):
    return open_clip.tokenizer.default_bpe()


@pytest.fixture(scope="module")
def preprocess(open_clip):
    """open_clip's eval transform for ViT-B-32 (Resize 224 bicubic, CenterCrop, OpenAI norm)."""
    _, _, pre = open_clip.create_model_and_transforms("ViT-B-32", pretrained=None)
    return pre


def _tiny_open_clip(open_clip, config, seed):
    import torch
    torch.manual_seed(seed)
    model = open_clip.model.CLIP(
        config.embed_dim,
        dict(image_size=config.image_size, layers=config.vision_layers, width=config.vision_width,
             head_width=config.vision_width // config.vision_heads, patch_size=config.patch_size),
        dict(context_length=config.context_length, vocab_size=config.vocab_size,
             width=config.text_width, heads=config.text_heads, layers=config.text_layers),
        quick_gelu=config.quick_gelu)
    with torch.no_grad():  # LayerNorm scales, biases, attention biases: none left at 1 or 0
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="module", params=[(TINY, "open_clip_pytorch_model.bin"),
                                        (TINY_QUICK, "open_clip_model.safetensors")],
                ids=["gelu-bin", "quickgelu-safetensors"])
def reference(open_clip, request, tmp_path_factory):
    """(open_clip's tiny CLIP, its config, its weights saved as open_clip ships them)."""
    import torch
    config, filename = request.param
    model = _tiny_open_clip(open_clip, config, seed=len(filename))
    path = tmp_path_factory.mktemp("clip") / filename
    if filename.endswith(".safetensors"):
        import safetensors.torch
        safetensors.torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()},
                                    str(path))
    else:
        torch.save(model.state_dict(), path)
    return model, config, str(path)


def _images(seed=0):
    """Random uint8 images: up- and downsampled, wide, tall, already 224, odd sizes."""
    rng = np.random.default_rng(seed)
    sizes = [(64, 64), (300, 200), (224, 224), (100, 517), (31, 45), (480, 640)]
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]


CAPTIONS = [
    "a photo of a cat",
    "A RED Square, left of a BLUE circle!!",
    "it's 3 o'clock; they'll say: \"we'd gone\" (12,345.6 %)",
    "  tabs\tand\nnewlines   and  &amp; entities &lt;b&gt; ",
    "héllo wörld — “quoted” ‘single’ Ｆｕｌｌｗｉｄｔｈ ﬁne café naïve",
    "日本語のテキスト 和 emoji 🐈‍⬛ ½ ² Ⅻ",
    "<start_of_text> inside, and <END_OF_TEXT> too",
    "long " + " ".join(f"word{i} with, punctuation!" for i in range(60)),
]


def test_tokenizer_matches_open_clip(open_clip, vocab):
    """Punctuation, case, contractions, numbers, HTML, unicode, specials, a text cut at 77."""
    ours = jclip.Tokenizer(vocab)
    theirs = open_clip.get_tokenizer("ViT-B-32")
    want = theirs(CAPTIONS).numpy()
    got = ours(CAPTIONS)
    assert got.dtype == np.int32 and got.shape == want.shape == (len(CAPTIONS), 77)
    np.testing.assert_array_equal(got, want)
    assert got[-1, -1] == ours.eot and (got[:, 0] == ours.sot).all()  # the long one is cut
    for text in CAPTIONS:
        assert ours.encode(text) == theirs.encode(text)


def test_tokenizer_without_ftfy(open_clip, vocab, monkeypatch):
    """Without ftfy, the fallback fixes what ftfy changes in well-formed text (curly quotes,
    full width, NFC); ligatures and mojibake are ftfy's alone."""
    monkeypatch.setitem(sys.modules, "ftfy", None)  # `import ftfy` raises ImportError
    texts = [t.replace("ﬁ", "fi") for t in CAPTIONS] + ["cafe\u0301 “x”"]
    np.testing.assert_array_equal(jclip.Tokenizer(vocab)(texts),
                                  open_clip.get_tokenizer("ViT-B-32")(texts).numpy())


def test_split_matches_regex():
    """`_pieces` (no `regex` package) against CLIP's pattern in `regex`: every character's class
    (those Python's unicodedata knows), and random strings over a mixed alphabet."""
    import regex
    flags = regex.IGNORECASE
    classes = {k: regex.compile(p, flags) for k, p in (("L", r"[\p{L}]"), ("N", r"[\p{N}]"),
                                                       ("O", r"[^\s\p{L}\p{N}]"))}
    pattern = regex.compile(r"<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|"
                            r"[\p{N}]|[^\s\p{L}\p{N}]+", flags)
    import unicodedata
    differ = []
    for cp in range(sys.maxunicode + 1):
        c = chr(cp)
        if unicodedata.category(c) in ("Cn", "Cs"):
            continue  # unassigned in this Python's Unicode (regex may know newer characters)
        theirs = next((k for k, p in classes.items() if p.match(c)), "S")
        if theirs != jclip._kind(c):
            differ.append(hex(cp))
    assert not differ
    alphabet = list("ab'sStTrRevmld <>_ofxnE\u017f1209.,!?-\t") + [
        "\u00e9", "\u00df", "\u0345", "\u2160", "\u00bd", "\u4e00", "\u3000", "\U0001f408",
        "<start_of_text>", "<end_of_text>", "'re", "'ll"]
    rng = random.Random(0)
    for _ in range(2000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        assert jclip._pieces(text) == pattern.findall(text), text


def test_preprocess_matches_open_clip(preprocess):
    """resize_and_crop equals open_clip's transform to the pixel (both PIL's bicubic resize);
    the normalized floats to float32 rounding."""
    import torch
    images = _images()
    want = torch.stack([preprocess(Image.fromarray(im)) for im in images])
    want = want.permute(0, 2, 3, 1).numpy()
    pixels = np.stack([jclip.resize_and_crop(im) for im in images])
    assert pixels.dtype == np.uint8 and pixels.shape == (len(images), 224, 224, 3)
    np.testing.assert_array_equal(pixels, np.round((want * np.asarray(jclip.OPENAI_STD)
                                                    + np.asarray(jclip.OPENAI_MEAN)) * 255))
    got = np.asarray(jclip.normalize(pixels))
    err = np.abs(got - want).max()
    print(f"preprocess: max abs diff {err:.3g} (normalized pixels, range ~[-1.8, 2.2])")
    assert err <= 1e-6
    pil = [Image.fromarray(im).convert("L") for im in images[:2]]  # grey: converted to RGB
    np.testing.assert_array_equal(np.stack([jclip.resize_and_crop(im) for im in pil]),
                                  np.round((torch.stack([preprocess(im) for im in pil])
                                            .permute(0, 2, 3, 1).numpy()
                                            * np.asarray(jclip.OPENAI_STD)
                                            + np.asarray(jclip.OPENAI_MEAN)) * 255))


def test_embeddings_and_score_match_open_clip(reference, vocab, preprocess):
    """Image and text embeddings on the same pixels and token ids, the cosines, the score."""
    import torch
    model, config, path = reference
    scorer = clip_score.ClipScorer(path, vocab, config, batch=4)  # 6 images: a padded batch
    images = _images(1)
    captions = CAPTIONS[:len(images)]
    with torch.no_grad():
        x = torch.stack([preprocess(Image.fromarray(im)) for im in images])
        ids = torch.from_numpy(scorer.tokenizer(captions)).long()
        want_image = model.encode_image(x, normalize=True).numpy()
        want_text = model.encode_text(ids, normalize=True).numpy()
    got_image, got_text = scorer.image_embeddings(images), scorer.text_embeddings(captions)
    for name, got, want in (("image", got_image, want_image), ("text", got_text, want_text)):
        err = np.abs(got - want).max()
        print(f"{os.path.basename(path)}: {name} embeddings max abs diff {err:.3g} (unit vectors "
              f"of {want.shape[1]})")
        assert got.shape == want.shape and err <= 1e-5
    want_cos = (want_image * want_text).sum(-1)
    cos = scorer.cosines(images, captions)
    np.testing.assert_allclose(cos, want_cos, rtol=0, atol=1e-5)
    want_score = float((100 * torch.clamp(torch.from_numpy(want_cos), min=0)).mean())
    got_score = scorer.score(images, captions)
    print(f"clip score {got_score:.6f} vs {want_score:.6f}; cosines {np.round(want_cos, 3)}")
    assert got_score == pytest.approx(want_score, abs=1e-4)
    # the same embeddings from image files, read a batch at a time
    files = []
    for i, im in enumerate(images):
        files.append(os.path.join(os.path.dirname(path), f"{i}.png"))
        Image.fromarray(im).save(files[-1])
    np.testing.assert_allclose(scorer.image_embeddings(files), got_image, rtol=0, atol=1e-6)


def test_archs_are_open_clips_configs(open_clip):
    """Every entry of ARCHS is open_clip's model config of that name."""
    for name, c in jclip.ARCHS.items():
        cfg = open_clip.get_model_config(name)
        vision, text = cfg["vision_cfg"], cfg["text_cfg"]
        want = jclip.ClipConfig(
            embed_dim=cfg["embed_dim"], image_size=vision["image_size"],
            patch_size=vision["patch_size"], vision_width=vision["width"],
            vision_layers=vision["layers"],
            vision_heads=vision["width"] // vision.get("head_width", 64),
            text_width=text["width"], text_layers=text["layers"], text_heads=text["heads"],
            context_length=text["context_length"], vocab_size=text["vocab_size"],
            mlp_ratio=vision.get("mlp_ratio", 4.0), quick_gelu=cfg.get("quick_gelu", False))
        assert c == want, name
        assert text.get("mlp_ratio", 4.0) == c.mlp_ratio, name
    assert jclip.DEFAULT_ARCH == "ViT-B-32"


@pytest.mark.slow
def test_vit_b32_matches_open_clip(open_clip, vocab, preprocess, tmp_path):
    """The default architecture at full size (open_clip's ViT-B-32 with its random init)."""
    import torch
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32", pretrained=None).eval()
    path = tmp_path / "open_clip_pytorch_model.bin"
    torch.save(model.state_dict(), path)
    scorer = clip_score.ClipScorer(str(path), vocab, batch=2)
    images, captions = _images(2)[:2], CAPTIONS[1:3]
    with torch.no_grad():
        x = torch.stack([preprocess(Image.fromarray(im)) for im in images])
        want_image = model.encode_image(x, normalize=True).numpy()
        want_text = model.encode_text(torch.from_numpy(scorer.tokenizer(captions)).long(),
                                      normalize=True).numpy()
    for name, got, want in (("image", scorer.image_embeddings(images), want_image),
                            ("text", scorer.text_embeddings(captions), want_text)):
        err = np.abs(got - want).max()
        print(f"ViT-B-32: {name} embeddings max abs diff {err:.3g} (unit vectors of 512)")
        assert err <= 1e-5


def test_clip_score_definition():
    """100 * max(cos, 0) per pair, averaged (torchmetrics' formula; Hessel et al.'s with 100)."""
    assert clip_score.clip_score([0.3, 0.2]) == pytest.approx(25.0)
    assert clip_score.clip_score([0.3, -0.2]) == pytest.approx(15.0)
    assert clip_score.clip_score([-0.5]) == 0.0
    with pytest.raises(ValueError):
        clip_score.clip_score([])


def test_wrong_architecture_and_files_are_named(reference, vocab, tmp_path):
    _, config, path = reference
    with pytest.raises(ValueError, match=r"has shape .* CLIP ViT-B-32 expects .* another "
                                         "architecture"):
        jclip.load_clip(path, "ViT-B-32")
    with pytest.raises(ValueError, match="ViT-L-14"):
        jclip.arch("ViT-X-99")
    state = {"extra.weight": np.zeros(3, np.float32), **_state(path)}
    with pytest.raises(ValueError, match="does not use.*extra.weight"):
        jclip.from_state_dict(state, config)
    with pytest.raises(FileNotFoundError, match="bpe_simple_vocab_16e6.txt.gz"):
        jclip.Tokenizer(str(tmp_path / "missing.txt.gz"))
    not_gz = tmp_path / "vocab.txt.gz"
    not_gz.write_text("plain text")
    with pytest.raises(ValueError, match="not a gzipped BPE merges file"):
        jclip.Tokenizer(str(not_gz))


def _state(path):
    from transfusion_jax.models.autoencoder import weight_files
    return weight_files.read_weights(path)


def test_missing_files_stop_the_fid_evaluator_first(tmp_path, vocab, monkeypatch):
    """Named by option and path, with where to get the file, before anything is loaded."""
    context = common.Context(load_config("experiments/transfusion.py:tiny"), WordTokenizer(),
                             None, str(tmp_path))
    monkeypatch.setattr(fid, "Inception", lambda *a, **k: pytest.fail("work started"))
    weights = str(tmp_path / "open_clip_pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match=r"clip_weights=.*open_clip_pytorch_model.bin.*"
                                                "does not exist.*laion2b_s34b_b79k"):
        fid.Evaluator(context, num=4, random_weights=True, clip_weights=weights,
                      clip_vocab=vocab)
    missing_vocab = str(tmp_path / "bpe_simple_vocab_16e6.txt.gz")
    open(weights, "wb").close()
    with pytest.raises(FileNotFoundError, match=r"clip_vocab=.*bpe_simple_vocab_16e6.txt.gz.*"
                                                "does not exist.*open_clip"):
        fid.Evaluator(context, num=4, random_weights=True, clip_weights=weights,
                      clip_vocab=missing_vocab)
    with pytest.raises(FileNotFoundError, match="clip_vocab: the CLIP score needs"):
        fid.Evaluator(context, num=4, random_weights=True, clip_weights=weights)
    with pytest.raises(ValueError, match="CLIP model 'ViT-Q'"):
        fid.Evaluator(context, num=4, random_weights=True, clip_weights=weights,
                      clip_vocab=vocab, clip_model="ViT-Q")
    with pytest.raises(ValueError, match="clip_normalize='imagenet'"):
        fid.Evaluator(context, num=4, random_weights=True, clip_weights=weights,
                      clip_vocab=vocab, clip_normalize="imagenet")


@pytest.mark.slow
def test_fid_evaluator_reports_clip_score_on_tiny_preset(open_clip, vocab, preprocess, tmp_path,
                                                         monkeypatch):
    """The fid evaluator generates once and reports clip_score beside fid; the score equals
    open_clip's on the images it generated."""
    import torch
    model = _tiny_open_clip(open_clip, TINY, seed=3)
    weights = tmp_path / "open_clip_pytorch_model.bin"
    torch.save(model.state_dict(), weights)
    monkeypatch.setitem(jclip.ARCHS, "tiny-test", TINY)
    config = load_config("experiments/transfusion.py:tiny")
    context = common.Context(config, WordTokenizer(), None, str(tmp_path))
    evaluator = fid.Evaluator(context, num=6, batch=4, random_weights=True, dims=64,
                              sampler="ddim", steps=2, guidance=3.0, clip_weights=str(weights),
                              clip_vocab=vocab, clip_model="tiny-test")
    generated = []
    generate = evaluator.generate
    monkeypatch.setattr(evaluator, "generate",
                        lambda *a: generated.append(generate(*a)) or generated[-1])
    out = tmp_path / "out"
    out.mkdir()
    variables = jax.jit(lambda: random_params(config.model))()
    scores = evaluator.run(variables, str(out))
    assert sorted(scores) == ["clip_score", "fid64_random_weights"]
    images = np.concatenate(generated)
    assert images.shape[0] == 6 and images.dtype == np.uint8
    with torch.no_grad():
        x = torch.stack([preprocess(Image.fromarray(im)) for im in images])
        ids = open_clip.get_tokenizer("ViT-B-32")(evaluator.captions)
        want = (model.encode_image(x, normalize=True)
                * model.encode_text(ids, normalize=True)).sum(-1).numpy()
    np.testing.assert_allclose(np.load(out / "clip_cosines.npy"), want, rtol=0, atol=1e-5)
    assert scores["clip_score"] == pytest.approx(float(np.mean(100 * np.maximum(want, 0))),
                                                 abs=1e-3)
    generated.clear()
    assert evaluator.run(variables, str(out)) == scores  # same seed: same images, same score


def test_hash_tokenizer_stands_in_without_the_vocabulary():
    """The random-weight stand-in: pieces cleaned and split as CLIP's tokenizer does, hashed to
    stable ids (the same in every process: these literals) between CLIP's start and end tokens,
    the end token the highest id of its row; zero-padded, cut at 77 ending with the end token."""
    tok = jclip.HashTokenizer()
    assert (tok.sot, tok.eot) == (49406, 49407)
    assert tok.encode("A red  square, left of a &amp; BLUE circle.") == [
        19874, 7849, 32347, 27728, 12100, 40016, 19874, 22899, 44344, 15480, 21375]
    assert tok.encode("a RED square") == tok.encode(" a red\tsquare ") == [19874, 7849, 32347]
    rows = tok(CAPTIONS)
    assert rows.dtype == np.int32 and rows.shape == (len(CAPTIONS), 77)
    assert (rows[:, 0] == tok.sot).all() and (rows.argmax(-1) == (rows == tok.eot).argmax(-1)).all()
    assert rows[-1, -1] == tok.eot and (rows[:-1] == tok.eot).sum(-1).tolist() == [1] * 7
    first = [tok.sot] + tok.encode(CAPTIONS[0]) + [tok.eot]  # "a photo of a cat": 5 pieces
    assert len(first) == 7 and rows[0, :7].tolist() == first and (rows[0, 7:] == 0).all()
    small = jclip.HashTokenizer(context_length=8, vocab_size=100)
    assert small("one two three four five six seven eight nine").tolist() == [
        [98] + small.encode("one two three four five six") + [99]]
    assert max(small.encode(" ".join(CAPTIONS))) < 98


def test_clip_random_weights_options_are_checked_first(tmp_path, monkeypatch):
    """clip_random_weights with a weight file too, or a clip_vocab that does not exist, or an
    unknown model: an error before any work."""
    context = common.Context(load_config("experiments/transfusion.py:tiny"), WordTokenizer(),
                             None, str(tmp_path))
    monkeypatch.setattr(fid, "Inception", lambda *a, **k: pytest.fail("work started"))
    with pytest.raises(ValueError, match="clip_weights=.* and clip_random_weights=True: give one"):
        fid.Evaluator(context, num=4, random_weights=True, clip_random_weights=True,
                      clip_weights=str(tmp_path / "w.bin"))
    with pytest.raises(FileNotFoundError, match=r"clip_vocab=.*missing.txt.gz.*does not exist"):
        fid.Evaluator(context, num=4, random_weights=True, clip_random_weights=True,
                      clip_vocab=str(tmp_path / "missing.txt.gz"))
    with pytest.raises(ValueError, match="CLIP model 'ViT-Q'"):
        fid.Evaluator(context, num=4, random_weights=True, clip_random_weights=True,
                      clip_model="ViT-Q")


def test_clip_scorer_random_weights(monkeypatch):
    """random_weights=True, no file: the tiny architecture's random network of `seed` (the same
    seed, the same embeddings), unit embeddings, captions by the stand-in tokenizer."""
    monkeypatch.setitem(jclip.ARCHS, "tiny-test", TINY)
    scorer = clip_score.ClipScorer("", "", "tiny-test", batch=4, random_weights=True, seed=3)
    assert isinstance(scorer.tokenizer, jclip.HashTokenizer)
    images, captions = _images(3), CAPTIONS[:6]  # 6: a padded batch
    image, text = scorer.image_embeddings(images), scorer.text_embeddings(captions)
    assert image.shape == text.shape == (6, TINY.embed_dim)
    np.testing.assert_allclose(np.linalg.norm(image, axis=-1), 1, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(text, axis=-1), 1, atol=1e-5)
    again = clip_score.ClipScorer("", "", "tiny-test", batch=6, random_weights=True, seed=3)
    np.testing.assert_allclose(again.cosines(images, captions), (image * text).sum(-1),
                               rtol=0, atol=1e-6)
    assert scorer.score(images, captions) == clip_score.clip_score((image * text).sum(-1))


@pytest.mark.slow
def test_fid_evaluator_reports_clip_score_random_weights_on_tiny_preset(tmp_path, monkeypatch):
    """clip_random_weights=True: no weight file, no vocabulary file; the score is labelled
    clip_score_random_weights beside fid64_random_weights, equals a ClipScorer of the same
    random network (same seed) on the images the evaluator generated, and repeats exactly."""
    monkeypatch.setitem(jclip.ARCHS, "tiny-test", TINY)
    config = load_config("experiments/transfusion.py:tiny")
    context = common.Context(config, WordTokenizer(), None, str(tmp_path))
    evaluator = fid.Evaluator(context, num=6, batch=4, random_weights=True, dims=64,
                              sampler="ddim", steps=2, guidance=3.0, seed=1,
                              clip_random_weights=True, clip_model="tiny-test")
    assert isinstance(evaluator.clip.tokenizer, jclip.HashTokenizer)
    generated = []
    generate = evaluator.generate
    monkeypatch.setattr(evaluator, "generate",
                        lambda *a: generated.append(generate(*a)) or generated[-1])
    out = tmp_path / "out"
    out.mkdir()
    variables = jax.jit(lambda: random_params(config.model))()
    scores = evaluator.run(variables, str(out))
    assert sorted(scores) == ["clip_score_random_weights", "fid64_random_weights"]
    images = np.concatenate(generated)
    assert images.shape[0] == 6 and images.dtype == np.uint8
    scorer = clip_score.ClipScorer("", "", "tiny-test", batch=3, random_weights=True, seed=1)
    want = scorer.cosines(images, evaluator.captions)
    cosines = np.load(out / "clip_cosines.npy")
    assert cosines.shape == (6,) and np.isfinite(cosines).all()
    np.testing.assert_allclose(cosines, want, rtol=0, atol=1e-5)
    assert scores["clip_score_random_weights"] == pytest.approx(clip_score.clip_score(want),
                                                                abs=1e-3)
    other = clip_score.ClipScorer("", "", "tiny-test", batch=3, random_weights=True, seed=2)
    assert np.abs(other.cosines(images, evaluator.captions) - want).max() > 1e-3  # seeded
    generated.clear()
    assert evaluator.run(variables, str(out)) == scores  # same seeds: same images, same score


def test_clip_random_weights_with_vocab_uses_clips_tokenizer(open_clip, vocab, tmp_path,
                                                             monkeypatch):
    """Given clip_vocab, the random-weight CLIP tokenizes with CLIP's own BPE (open_clip's ids)."""
    monkeypatch.setitem(jclip.ARCHS, "tiny-test", TINY)
    scorer = clip_score.ClipScorer("", vocab, "tiny-test", batch=2, random_weights=True)
    assert isinstance(scorer.tokenizer, jclip.Tokenizer)
    np.testing.assert_array_equal(scorer.tokenizer(CAPTIONS[:3]),
                                  open_clip.get_tokenizer("ViT-B-32")(CAPTIONS[:3]).numpy())
    with pytest.raises(ValueError, match="weights=.* and random_weights=True: give one"):
        clip_score.ClipScorer(str(tmp_path / "w.bin"), vocab, "tiny-test", random_weights=True)


def test_fid_decoder_runs_on_a_mesh():
    """The fid evaluator's decoder on the run's mesh (as python -m transfusion_jax.evaluate runs
    the evaluators): the codec's variables, restored onto one device, are closed over, not
    passed (as arguments they clashed with the mesh: 'Received incompatible devices')."""
    import dataclasses

    @dataclasses.dataclass
    class Codec:
        kind: str
        variables: dict

        def decode(self, v, z):
            return z * v["scale"]

        def decode_ids(self, v, ids):
            return v["table"][ids]

    on_one = {"scale": jax.device_put(np.float32(0.5), jax.devices()[0]),
              "table": jax.device_put(np.linspace(-2, 2, 5, dtype=np.float32), jax.devices()[0])}
    z = np.linspace(-4, 4, 2 * 3 * 3 * 3, dtype=np.float32).reshape(2, 3, 3, 3)
    ids = np.arange(2 * 3 * 3).reshape(2, 3, 3) % 5
    with jax.set_mesh(jax.make_mesh((2,), ("data",), devices=jax.devices()[:2])):
        pixels = fid._batch_decoder(Codec("vae", on_one))(z)
        from_ids = fid._batch_decoder(Codec("vq", on_one))(ids)
    np.testing.assert_allclose(pixels, np.clip(z * 0.5, -1, 1))
    np.testing.assert_allclose(from_ids, np.clip(np.linspace(-2, 2, 5)[ids], -1, 1))
