"""Generation tasks (inference/tasks.py) and the generate CLI's arguments, on a tiny random model."""

import numpy as np
import pytest
from PIL import Image

from transfusion_jax import generate as generate_cli
from transfusion_jax.core.config import load_config
from transfusion_jax.inference.tasks import Sampling, run_tasks
from test_generate import random_params


class FakeTokenizer:
    """Characters as ids 10.. (enough for the CLI's plumbing; real ones come from the workdir)."""
    pad_id, bos_id, eos_id, boi_id, eoi_id = 0, 1, 2, 3, 4

    def encode(self, text):
        return [10 + (ord(c) % 400) for c in text]

    def decode(self, ids):
        return "".join(chr(int(i) - 10) if int(i) >= 10 else "" for i in ids)


@pytest.mark.slow
def test_every_task_writes_grids_and_text(tmp_path):
    config = load_config("experiments/transfusion.py:tiny")
    params = random_params(config.model)
    size = config.data.image_size
    png = tmp_path / "in.png"
    Image.fromarray(np.full((size, size, 3), 128, np.uint8)).save(png)
    args = generate_cli.parse_args([
        "--workdir", str(tmp_path), "--prompt", "a red circle", "--prompt", "two squares",
        "--image", str(png), "--free", "A", "--num-samples", "2", "--sampler", "ddim",
        "--steps", "2", "--max-new-tokens", "4", "--max-images", "1", "--temperature", "1"])
    records = run_tasks(config, params, FakeTokenizer(), generate_cli.sampling_from_args(args),
                        prompts=args.prompt, images=args.image, free=args.free, out=str(tmp_path))
    tasks = [r["task"] for r in records]
    assert tasks.count("text_to_image") == 4 and tasks.count("image_to_text") == 2
    assert tasks.count("free") == 2
    assert all(r["images"] == 1 for r in records if r["task"] == "text_to_image")
    latent_shape = (config.model.latent_size,) * 2 + (config.model.latent_channels,)
    assert all(len(r["latents"]) == r["images"] == len(r["pixels"]) for r in records)
    assert all(z.shape == latent_shape for r in records for z in r["latents"])
    assert all(r["images"] == 0 for r in records if r["task"] == "image_to_text")
    grid = np.asarray(Image.open(tmp_path / "text_to_image.png"))
    assert grid.shape == (2 * (size + 2), 2 * (size + 2), 3)


def test_arguments_are_checked():
    with pytest.raises(SystemExit):
        generate_cli.parse_args(["--workdir", "w"])
    with pytest.raises(SystemExit):
        generate_cli.parse_args(["--workdir", "w", "--question", "why?", "--prompt", "x"])
    config = load_config("experiments/transfusion.py:tiny")
    with pytest.raises(ValueError, match="1 questions for 2 images: expected one question, or "
                                         "one per image"):
        run_tasks(config, None, FakeTokenizer(), Sampling(), images=["a", "b"], question=["q"])
    with pytest.raises(ValueError, match="question needs images"):
        run_tasks(config, None, FakeTokenizer(), Sampling(), question=["q"])


def test_sampling_options_are_checked():
    with pytest.raises(ValueError, match="sampler='euler'"):
        Sampling(sampler="euler")
    with pytest.raises(ValueError, match="num_samples=0"):
        Sampling(num_samples=0)


@pytest.mark.slow
def test_images_as_arrays_caption_as_their_png_files_do(tmp_path):
    """Evaluators pass uint8 arrays, the CLI passes PNG paths: the same captions come out."""
    config = load_config("experiments/transfusion.py:tiny")
    params = random_params(config.model)
    size = config.data.image_size
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(2)]
    paths = []
    for i, a in enumerate(arrays):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(a).save(paths[-1])
    sampling = Sampling(num_samples=1, max_new_tokens=6, temperature=1.0, seed=3)
    from_paths = run_tasks(config, params, FakeTokenizer(), sampling, images=paths)
    from_arrays = run_tasks(config, params, FakeTokenizer(), sampling, images=arrays,
                            names=["a", "b"])
    assert [r["text"] for r in from_paths] == [r["text"] for r in from_arrays]
    assert [r["input"] for r in from_arrays] == ["a", "b"]


@pytest.mark.slow
def test_missing_or_corrupt_images_and_overlong_prompts_are_named(tmp_path):
    config = load_config("experiments/transfusion.py:tiny")
    params = random_params(config.model)
    sampling = Sampling(num_samples=1, steps=2, max_new_tokens=2)
    with pytest.raises(ValueError, match="image '.*nowhere.png': missing image"):
        run_tasks(config, params, FakeTokenizer(), sampling, images=[str(tmp_path / "nowhere.png")])
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG not really")
    with pytest.raises(ValueError, match="image '.*bad.png': corrupt image"):
        run_tasks(config, params, FakeTokenizer(), sampling, images=[str(bad)])
    with pytest.raises(ValueError, match=r"prompt 0 .* is 219 elements long with the image it "
                                         r"asks for \(16 elements and EOI\); the model's context "
                                         r"\(data.seq_len\) is 128"):
        run_tasks(config, params, FakeTokenizer(), sampling, prompts=["x" * 200])
    # 115 tokens fit the context as text; with its image's 16 patches and EOI they do not.
    with pytest.raises(ValueError, match=r"is 134 elements long with the image"):
        run_tasks(config, params, FakeTokenizer(), sampling, prompts=["x" * 115])
    with pytest.raises(ValueError, match=r"prompt 0 .* is 202 elements long; the model's context"):
        run_tasks(config, params, FakeTokenizer(), sampling, free=["x" * 200])
