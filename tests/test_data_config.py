"""The data config: defaults, overrides, and errors that name the field."""
import ml_collections
import numpy as np
import pytest

from transfusion_jax.data.config import check_fits, get_data_config, resolve_max_images, validate_data_config


def test_defaults_follow_the_paper():
    c = get_data_config()
    assert (c.caption_first_prob, c.p_uncond, c.text_to_patch_ratio) == (0.8, 0.1, 1.0)
    assert c.text_source == c.image_source == "shapes" and c.image_size == 64
    assert "patches_per_image" not in c  # a model property, passed to the pipeline
    assert c.noise_limit is True  # image-first captions noised at t < T/2 (Table 8)


@pytest.mark.parametrize("overrides,field", [
    (dict(seq_lenn=8), "data.seq_lenn"),
    (dict(seq_len=0), "data.seq_len"),
    (dict(seq_len="long"), "data.seq_len"),
    (dict(caption_first_prob=1.5), "data.caption_first_prob"),
    (dict(text_source="c4"), "data.text_source"),
    (dict(text_source="none", image_source="none"), "data.text_source"),
    (dict(text_source="text_files"), "data.text_files_path"),
    (dict(image_source="coco"), "data.coco_karpathy_json"),
    (dict(max_images=0), "data.max_images"),
    (dict(text_to_patch_ratio=0.0), "data.text_to_patch_ratio"),
    (dict(shapes_split="test"), "data.shapes_split"),
    (dict(noise_limit=1), "data.noise_limit"),
    (dict(noise_limit="no"), "data.noise_limit"),
])
def test_bad_values_name_the_field(overrides, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        get_data_config(**overrides)


def test_image_that_cannot_fit_a_row():
    c = get_data_config(seq_len=64)
    check_fits(c, 62)
    with pytest.raises(ValueError, match=r"patches_per_image \(63\).*data\.seq_len \(64\)"):
        check_fits(c, 63)
    assert resolve_max_images(c, 14) == 4  # 64 // (14 + 2)
    assert resolve_max_images(c, np.int64(14)) == 4
    for bad in (0, 2.5, "16", True):
        with pytest.raises(ValueError, match="patches_per_image"):
            check_fits(c, bad)
    assert resolve_max_images(get_data_config(seq_len=64, max_images=2), 14) == 2


def test_mutated_config_is_checked_again():
    c = get_data_config()
    c.p_uncond = 2.0
    with pytest.raises(ValueError, match="data.p_uncond"):
        validate_data_config(c)
    c = ml_collections.ConfigDict({**get_data_config().to_dict(), "noise_limit": 0})
    with pytest.raises(ValueError, match="data.noise_limit = 0: expected true or false"):
        validate_data_config(c)  # a config.json read back, types not kept
