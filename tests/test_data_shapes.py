"""The shapes world: scenes, rendering, captions, documents and the two parsers."""
import numpy as np

from transfusion_jax.data.shapes import world as shapes, text as shapes_text
from transfusion_jax.data.shapes.world import POSITIONS, parse_image, render_scene, sample_scene, scene_rng


def _scene(split, i):
    return sample_scene(scene_rng(0, split, i))


def test_parser_reads_back_999_of_1000_heldout_objects():
    right = total = 0
    for i in range(1000):
        scene = _scene("heldout", i)
        r, n = shapes.object_accuracy(list(scene.objects), parse_image(render_scene(scene)))
        right, total = right + r, total + n
    accuracy = right / total
    print(f"parser accuracy {accuracy:.4f} on {total} objects")
    assert total >= 1500 and accuracy >= 0.99


def test_parser_reads_contract_pixels_and_empty_images():
    scene = _scene("heldout", 3)
    image = render_scene(scene)
    as_contract = image.astype(np.float32) / 127.5 - 1  # what the batch holds
    assert parse_image(as_contract) == parse_image(image) == list(scene.objects)
    blank = np.zeros_like(image) + np.asarray(shapes.BACKGROUND, np.uint8)
    assert parse_image(blank) == []


def test_scenes_cover_the_world_and_splits_differ():
    train = [_scene("train", i) for i in range(500)]
    objects = [o for s in train for o in s.objects]
    assert {o.colour for o in objects} == set(shapes.COLOURS) and len(shapes.COLOURS) >= 6
    assert {o.shape for o in objects} == {"circle", "square", "triangle"}
    assert {o.size for o in objects} == {"small", "large"}
    assert {o.position for o in objects} == set(POSITIONS)
    assert {len(s.objects) for s in train} == {1, 2, 3}
    assert all(len({o.position for o in s.objects}) == len(s.objects) for s in train)
    heldout = [_scene("heldout", i) for i in range(500)]
    assert sum(a.objects == b.objects for a, b in zip(train, heldout)) < 10
    assert _scene("train", 7) == _scene("train", 7)  # a pure function of (seed, split, index)


def test_rendering_is_anti_aliased_and_sized():
    scene = _scene("train", 1)
    for size in (64, 96):
        image = render_scene(scene, size)
        assert image.shape == (size, size, 3) and image.dtype == np.uint8
    # Edge pixels blend object and background: values strictly between the two exist.
    image = render_scene(shapes.Scene((shapes.ShapeObject("white", "circle", "large", "center"),),
                                      ((0.0, 0.0),)), 64)
    grey = image[..., 0]
    assert np.sum((grey > shapes.BACKGROUND[0] + 20) & (grey < 240 - 20)) >= 10


def test_captions_name_every_attribute_and_parse_back():
    kinds = set()
    for i in range(1000):
        rng = scene_rng(0, "heldout", i)
        scene = sample_scene(rng)
        text = shapes_text.caption(scene, rng)
        kinds.add(text.split()[0])
        assert shapes_text.parse_caption(text) == list(scene.objects), text
    assert len(kinds) >= 5  # varied templates


def test_caption_parser_on_free_text():
    text = "Two things: a big blue square at the lower right; the thing at the top is a red circle."
    assert shapes_text.parse_caption(text) == [
        shapes.ShapeObject("blue", "square", "large", "bottom right")]
    text = "A little green triangle in the middle and in the upper left is a large white circle."
    assert shapes_text.parse_caption(text) == [
        shapes.ShapeObject("white", "circle", "large", "top left"),
        shapes.ShapeObject("green", "triangle", "small", "center")]


def test_relation_sentences_are_true():
    for i in range(200):
        rng = scene_rng(0, "train", i)
        scene = sample_scene(rng)
        sentence = shapes_text.relation_sentence(scene, rng)
        if not sentence:
            continue
        by_name = {f"{o.size} {o.colour} {o.shape}": o for o in scene.objects}
        words = sentence[len("The "):-1]
        for rel in ("to the left of", "to the right of", "above", "below"):
            if f" is {rel} the " in words:
                a, b = words.split(f" is {rel} the ")
                (ra, ca), (rb, cb) = (divmod(POSITIONS.index(by_name[x].position), 3) for x in (a, b))
                assert {"to the left of": ca < cb, "to the right of": ca > cb,
                        "above": ra < rb, "below": ra > rb}[rel], sentence


def test_documents_of_three_kinds():
    pair = shapes_text.pair_record(0, "train", 0, 64)
    assert pair["image"].shape == (64, 64, 3) and pair["caption"]
    # The caption describes its own image.
    assert shapes_text.parse_caption(pair["caption"]) == parse_image(pair["image"])
    doc = shapes_text.interleaved_record(0, "train", 0, 32)
    images = [p for p in doc["parts"] if "image" in p]
    texts = [p["text"] for p in doc["parts"] if "text" in p]
    # A title first (never an image: after "BOS BOI" only caption pairs go on), then the Q&A.
    assert "text" in doc["parts"][0] and "Question:" not in texts[0]
    assert len(images) >= 2 and all("Question:" in t and "Answer:" in t for t in texts[1:])
    assert "image" in doc["parts"][1]  # then an image, then its questions
    text = shapes_text.text_record(0, "train", 0)["text"]
    assert shapes_text.parse_caption(text) and "Answer:" in text


def test_answers_are_right():
    for i in range(300):
        rng = scene_rng(0, "train", i)
        scene = sample_scene(rng)
        q, a = shapes_text.question_answer(scene, rng)
        by_pos = {o.position: o for o in scene.objects}
        if q.startswith("What colour is the shape in the "):
            assert a == by_pos[q[len("What colour is the shape in the "):-1]].colour
        elif q.startswith("How many"):
            assert a == ("zero", "one", "two", "three")[len(scene.objects)]
        elif q.startswith("Is there a "):
            colour, shape = q[len("Is there a "):-1].split()
            assert (a == "yes") == any(o.colour == colour and o.shape == shape for o in scene.objects)
        elif q.startswith("What is in the "):
            where = q[len("What is in the "):-1]
            assert (a == "nothing") == (where not in by_pos)


def test_parser_is_robust_to_pixel_noise():
    """Generated images are noisy: Gaussian noise of 20/255 per channel costs < 1% of objects."""
    rng = np.random.default_rng(0)
    right = total = 0
    for i in range(300):
        scene = _scene("heldout", 5000 + i)
        noisy = render_scene(scene).astype(np.float32) + rng.normal(0, 20, (64, 64, 3))
        parsed = parse_image(np.clip(noisy, 0, 255).astype(np.uint8))
        r, n = shapes.object_accuracy(list(scene.objects), parsed)
        right, total = right + r, total + n
    assert right / total >= 0.99
