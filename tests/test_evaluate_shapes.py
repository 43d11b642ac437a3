"""Shapes scores: rendered truth scores 100%, corrupted images and captions score lower."""
import numpy as np
import pytest

from transfusion_jax.evaluators import shapes_scores as ev
from transfusion_jax.data.shapes import world as shapes, text as shapes_text

N = 40


def heldout(n=N):
    out = []
    for i in range(n):
        rng = shapes.scene_rng(0, "heldout", i, stream=1)
        scene = shapes.sample_scene(rng)
        out.append((scene, shapes_text.caption(scene, rng)))
    return out


def test_rendered_truth_and_true_captions_score_full_marks():
    items = heldout()
    truths = [list(s.objects) for s, _ in items]
    images = [shapes.render_scene(s, 64) for s, _ in items]
    table = ev.score_shapes(images, truths, [c for _, c in items], truths)
    for task in ("text_to_image", "image_to_text"):
        s = table[task]
        for column in ("object", "position", "colour", "shape", "size", "count", "exact"):
            assert s[column] == 1.0, (task, column, s[column])
        assert s["spurious"] == 0.0
    text = ev.format_table(table)
    assert "| text_to_image | 40 | 100.0%" in text and "image_to_text" in text


def test_corrupted_images_and_captions_score_lower():
    items = heldout()
    truths = [list(s.objects) for s, _ in items]
    rng = np.random.default_rng(0)
    swapped = [shapes.render_scene(s, 64)[..., ::-1] for s, _ in items]  # RGB -> BGR: colours
    noisy = [np.clip(shapes.render_scene(s, 64) + rng.normal(0, 90, (64, 64, 3)), 0, 255)
             .astype(np.uint8) for s, _ in items]
    shifted = [shapes.render_scene(items[(i + 1) % N][0], 64) for i in range(N)]  # wrong scene
    base = ev.score_images([shapes.render_scene(s, 64) for s, _ in items], truths)
    colour = ev.score_images(swapped, truths)
    assert colour["colour"] < 0.8 and colour["position"] == 1.0 and colour["object"] < 0.8
    for corrupted in (noisy, shifted):
        s = ev.score_images(corrupted, truths)
        assert s["exact"] < base["exact"] and s["object"] < base["object"]
    wrong_words = [c.replace("circle", "square") if "circle" in c else c.replace("square", "circle")
                   for _, c in items]
    s = ev.score_captions(wrong_words, truths)
    assert s["shape"] < 1.0 and s["exact"] < 1.0 and s["colour"] == 1.0
    assert ev.score_captions(["Nothing here."] * N, truths)["position"] == 0.0


def test_mismatched_lengths_name_the_arguments():
    with pytest.raises(ValueError, match="2 predictions for 1 truths"):
        ev.score_objects([[], []], [[]])
