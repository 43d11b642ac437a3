"""GenEval export (evaluators/geneval.py) on the tiny preset with random weights, offline: a
3-prompt metadata file gives exactly the folder layout GenEval's evaluation/evaluate_images.py
reads, read back here the way that script reads it. The metadata lines are GenEval's own
(prompts/evaluation_metadata.jsonl of djghosh13/geneval: a counting, a position and a colour
attribution prompt)."""
import json
import os
import re

import jax
import numpy as np
import pytest
from PIL import Image

from transfusion_jax.core.config import load_config
from transfusion_jax.data.shapes.heldout import heldout_scenes
from transfusion_jax.evaluators import common, geneval, shapes_scores
from test_generate import random_params
from test_inference_tasks import FakeTokenizer

LINES = [
    '{"tag": "counting", "include": [{"class": "clock", "count": 2}], "exclude": [{"class": '
    '"clock", "count": 3}], "prompt": "a photo of two clocks"}',
    '{"tag": "position", "include": [{"class": "teddy bear", "count": 1}, {"class": "dog", '
    '"count": 1, "position": ["right of", 0]}], "prompt": "a photo of a dog right of a teddy '
    'bear"}',
    '{"tag": "color_attr", "include": [{"class": "wine glass", "count": 1, "color": "purple"}, '
    '{"class": "apple", "count": 1, "color": "black"}], "prompt": "a photo of a purple wine '
    'glass and a black apple"}',
]


def read_as_geneval(imagedir):
    """What evaluate_images.py's main() reads: {folder: (metadata, [image paths])}, taking the
    all-digit folders and the `\\d+\\.png` files of their samples/ (its own loop, written out)."""
    out = {}
    for subfolder in os.listdir(imagedir):
        folderpath = os.path.join(imagedir, subfolder)
        if not os.path.isdir(folderpath) or not subfolder.isdigit():
            continue
        with open(os.path.join(folderpath, "metadata.jsonl")) as fp:
            metadata = json.load(fp)
        images = []
        for imagename in os.listdir(os.path.join(folderpath, "samples")):
            imagepath = os.path.join(folderpath, "samples", imagename)
            if not os.path.isfile(imagepath) or not re.match(r"\d+\.png", imagename):
                continue
            images.append(imagepath)
        out[subfolder] = (metadata, sorted(images))
    return out


@pytest.fixture
def metadata_file(tmp_path):
    path = tmp_path / "evaluation_metadata.jsonl"
    path.write_text("\n".join(LINES) + "\n")
    return str(path)


@pytest.mark.slow
def test_three_prompts_give_genevals_layout(tmp_path, metadata_file):
    config = load_config("experiments/transfusion.py:tiny")
    size = config.data.image_size
    evals = {"geneval": {"type": "geneval", "every": 0, "path": metadata_file,
                         "images_per_prompt": 2, "batch": 4, "sampler": "ddim", "steps": 2,
                         "guidance": 3.0}}
    (built,) = common.from_config(evals, common.Context(config, FakeTokenizer(), None,
                                                        str(tmp_path)))
    out = tmp_path / "evals" / "0" / "geneval"
    (out / "00000" / "samples").mkdir(parents=True)
    Image.fromarray(np.zeros((size, size, 3), np.uint8)).save(out / "00000/samples/00007.png")
    variables = jax.jit(lambda: random_params(config.model))()
    scores = common.run([built], variables, 0, str(tmp_path))
    assert scores == {"geneval/prompts": 3.0, "geneval/images": 6.0}

    read = read_as_geneval(out)
    assert sorted(read) == ["00000", "00001", "00002"]
    for i, line in enumerate(LINES):
        metadata, images = read[f"{i:05}"]
        assert metadata == json.loads(line)
        assert (out / f"{i:05}" / "metadata.jsonl").read_text() == line  # byte for byte
        assert [os.path.basename(p) for p in images] == ["00000.png", "00001.png"]  # no stale
        for p in images:
            im = Image.open(p)
            assert im.size == (size, size) and im.mode == "RGB"
        pixels = [np.asarray(Image.open(p)) for p in images]
        grid = np.asarray(Image.open(out / f"{i:05}" / "grid.png"))
        assert grid.shape == (size + 4, 2 * (size + 2) + 2, 3)
        assert np.array_equal(grid[2:2 + size, 2:2 + size], pixels[0])
    first = np.asarray(Image.open(read["00000"][1][0]))
    assert first.std() > 0  # sampled, not blank

    again = common.run([built], variables, 0, str(tmp_path))  # same seed, same images
    assert again == scores
    assert np.array_equal(np.asarray(Image.open(read["00000"][1][0])), first)


def test_metadata_is_required_and_named(tmp_path, metadata_file):
    config = load_config("experiments/transfusion.py:tiny")
    context = common.Context(config, FakeTokenizer(), None, str(tmp_path))
    with pytest.raises(ValueError, match="geneval: path: the metadata JSONL of prompts is "
                       "required.*nothing is downloaded"):
        geneval.Evaluator(context)
    with pytest.raises(ValueError, match="path='.*nowhere.jsonl': no such file"):
        geneval.Evaluator(context, path=str(tmp_path / "nowhere.jsonl"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(LINES[0] + "\n" + '{"tag": "single_object"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2: expected a JSON object"):
        geneval.Evaluator(context, path=str(bad))
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"prompt": "a photo of " + "a red apple and " * 20}) + "\n")
    with pytest.raises(ValueError, match="data.seq_len"):
        geneval.Evaluator(context, path=str(long))
    assert [m["prompt"] for m in geneval.read_metadata(metadata_file, num=2)] == [
        "a photo of two clocks", "a photo of a dog right of a teddy bear"]
    with pytest.raises(ValueError, match="images_per_prompt=0"):
        geneval.Evaluator(context, path=metadata_file, images_per_prompt=0)


def test_make_grid_is_torchvisions_layout():
    a, b = np.full((3, 4, 3), 10, np.uint8), np.full((3, 4, 3), 200, np.uint8)
    grid = geneval.make_grid([a, b])
    assert grid.shape == (7, 14, 3)
    assert (grid[2:5, 2:6] == 10).all() and (grid[2:5, 8:12] == 200).all()
    assert grid.sum() == 10 * a.size + 200 * b.size  # the rest is padding 0


def test_shapes_evaluator_scores_genevals_categories_by_name():
    """The shapes evaluator's GenEval-like scalars (shapes.py: "<direction>/<score>") include
    whole objects, counts, colours and positions by name."""
    _, images, truths = heldout_scenes(0, 2, 32)
    table = shapes_scores.score_shapes(images=images, image_truths=truths,
                                       captions=["", ""], caption_truths=truths)
    for direction in ("text_to_image", "image_to_text"):
        assert {"object", "count", "colour", "position"} <= set(table[direction])
    assert table["text_to_image"]["object"] == 1.0  # the true images read back right
