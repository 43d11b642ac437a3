"""The held-out scenes of the shapes world, as evaluations and the demo read them.

Scenes come from the "heldout" split of `world.scene_rng`: no training document is drawn from
it, so a model that draws or describes them has not seen them.
"""
from transfusion_jax.data.shapes import text, world


def heldout_scenes(seed: int, num: int, image_size: int):
    """(captions, uint8 images [size, size, 3], object lists) of the first `num` held-out
    caption-image pairs of the world with shapes seed `seed`."""
    captions, images, scenes = [], [], []
    for i in range(num):
        rng = world.scene_rng(seed, "heldout", i, stream=1)
        scene = world.sample_scene(rng)
        scenes.append(scene.objects)
        images.append(world.render_scene(scene, image_size))
        captions.append(text.caption(scene, rng))
    return captions, images, scenes
