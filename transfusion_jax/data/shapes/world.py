"""The shapes world: procedurally rendered scenes, and a parser that reads them back.

A scene holds 1-3 objects, each a (colour, shape, size, position) on a 3x3 grid, at most one
object per cell, so that scenes are easy to describe in words and to score: `parse_image` reads
an image back into its object list with plain numpy (no model), which later issues use to score
generated images. Everything is a pure function of (seed, split, index), so splits and epochs
need no files and no download.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 230),
    "yellow": (240, 220, 40),
    "purple": (150, 60, 200),
    "orange": (250, 140, 30),
    "cyan": (40, 210, 220),
    "white": (240, 240, 240),
}
COLOUR_NAMES = tuple(COLOURS)
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large")
# Row-major 3x3 grid: index = 3 * row + column.
POSITIONS = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)
BACKGROUND = (24, 24, 32)
# Object extent as a fraction of a grid cell; centres jitter by up to JITTER of the free margin.
_EXTENT = {"small": 0.42, "large": 0.74}
_JITTER = 0.5
_SUPERSAMPLE = 4  # anti-aliasing: render masks at 4x and average 4x4 blocks
SPLIT_SEEDS = {"train": 0, "heldout": 1}


class ShapeObject(NamedTuple):
    colour: str
    shape: str
    size: str
    position: str


class Scene(NamedTuple):
    objects: tuple[ShapeObject, ...]
    offsets: tuple[tuple[float, float], ...]  # centre jitter per object, in [-1, 1] of the margin


def scene_rng(seed: int, split: str, index: int, stream: int = 0) -> np.random.Generator:
    """The generator for one item: splits differ by seed, so held-out scenes are unseen draws."""
    if split not in SPLIT_SEEDS:
        raise ValueError(f"split = {split!r}: expected one of {tuple(SPLIT_SEEDS)}")
    return np.random.default_rng([seed, SPLIT_SEEDS[split], stream, index])


def sample_scene(rng: np.random.Generator, max_objects: int = 3) -> Scene:
    n = int(rng.integers(1, max_objects + 1))
    cells = rng.choice(len(POSITIONS), size=n, replace=False)
    attributes = rng.integers((len(COLOUR_NAMES), len(SHAPES), len(SIZES)), size=(n, 3))
    objects = tuple(
        ShapeObject(COLOUR_NAMES[a], SHAPES[b], SIZES[c], POSITIONS[int(cell)])
        for (a, b, c), cell in zip(attributes, sorted(cells))
    )
    offsets = tuple((float(a), float(b)) for a, b in rng.uniform(-1, 1, size=(n, 2)))
    return Scene(objects, offsets)


def _cell_box(position: str, image_size: int) -> tuple[float, float, float]:
    """(x0, y0, cell) of a grid cell, in pixels."""
    row, col = divmod(POSITIONS.index(position), 3)
    cell = image_size / 3
    return col * cell, row * cell, cell


def _coverage(shape: str, xs: np.ndarray, ys: np.ndarray, cx: float, cy: float, r: float) -> np.ndarray:
    """Boolean inside-mask of a shape of half-extent r centred at (cx, cy), at sample points."""
    dx, dy = xs - cx, ys - cy
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        return (np.abs(dx) <= r) & (np.abs(dy) <= r)
    # Upright isosceles triangle filling the box: apex at top centre, base at the bottom.
    t = (dy + r) / (2 * r)  # 0 at the apex, 1 at the base
    return (t >= 0) & (t <= 1) & (np.abs(dx) <= r * t)


def render_scene(scene: Scene, image_size: int = 64) -> np.ndarray:
    """uint8 [image_size, image_size, 3], anti-aliased by supersampling each object's cell."""
    image = np.empty((image_size, image_size, 3), np.float32)
    image[:] = BACKGROUND
    s = _SUPERSAMPLE
    for obj, (jx, jy) in zip(scene.objects, scene.offsets):
        x0, y0, cell = _cell_box(obj.position, image_size)
        r = _EXTENT[obj.size] * cell / 2
        margin = cell / 2 - r - 1.0
        cx = x0 + cell / 2 + _JITTER * margin * jx
        cy = y0 + cell / 2 + _JITTER * margin * jy
        # Pixel window covering the cell; sample points at sub-pixel centres.
        px0, py0 = int(np.floor(x0)), int(np.floor(y0))
        px1, py1 = min(image_size, int(np.ceil(x0 + cell))), min(image_size, int(np.ceil(y0 + cell)))
        sub = (np.arange((px1 - px0) * s) + 0.5) / s + px0
        suby = (np.arange((py1 - py0) * s) + 0.5) / s + py0
        inside = _coverage(obj.shape, sub[None, :], suby[:, None], cx, cy, r)
        alpha = inside.reshape(py1 - py0, s, px1 - px0, s).mean(axis=(1, 3))[..., None]
        window = image[py0:py1, px0:px1]
        window[:] = window * (1 - alpha) + np.asarray(COLOURS[obj.colour], np.float32) * alpha
    return np.clip(np.round(image), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# Parser: image -> objects. Each grid cell holds at most one object and objects stay inside
# their cell, so the parser reads cell by cell: colour from the median of the most distinct
# pixels; coverage alpha by projecting each pixel onto the (background -> colour) line; then the
# shape whose anti-aliased rendering, fitted to the coverage mask's area and centroid, is closest
# to alpha, and the size from that fit. Fitting whole templates (rather than thresholding a
# feature) keeps it right under pixel noise, which matters for scoring generated images.

_PALETTE = np.asarray(list(COLOURS.values()), np.float32)
_MIN_AREA_FRACTION = 0.04  # of a cell; anything smaller is noise, not an object
_FOREGROUND_DISTANCE = 60.0  # RGB distance from the background


def _to_uint8_range(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"image shape {image.shape}: expected [H, W, 3]")
    if np.issubdtype(image.dtype, np.floating):
        return (np.clip(image, -1, 1) + 1) * 127.5  # the batch contract's [-1, 1] pixels
    return image.astype(np.float32)


# Each shape hypothesis: area as a multiple of r^2 (r = half extent), and how far the mask's
# centroid lies below the shape's box centre, as a multiple of r.
_AREA = {"circle": np.pi, "square": 4.0, "triangle": 2.0}
_CENTROID_DROP = {"circle": 0.0, "square": 0.0, "triangle": 1 / 3}


def _best_shape(alpha: np.ndarray, mask: np.ndarray) -> tuple[str, float]:
    """(shape, r) whose anti-aliased rendering, fitted to the mask's area and centroid,
    is closest to the observed coverage `alpha` (cell-local pixel coordinates)."""
    ys, xs = np.nonzero(mask)
    cx, cy, area = xs.mean() + 0.5, ys.mean() + 0.5, len(xs)
    s = _SUPERSAMPLE
    h, w = alpha.shape
    sub_x = ((np.arange(w * s) + 0.5) / s)[None, :]
    sub_y = ((np.arange(h * s) + 0.5) / s)[:, None]
    best = None
    for shape in SHAPES:
        r = float(np.sqrt(area / _AREA[shape]))
        inside = _coverage(shape, sub_x, sub_y, cx, cy - _CENTROID_DROP[shape] * r, r)
        error = np.sum((inside.reshape(h, s, w, s).mean(axis=(1, 3)) - alpha) ** 2)
        if best is None or error < best[0]:
            best = (error, shape, r)
    return best[1], best[2]


def _parse_cell(pixels: np.ndarray, cell: float) -> tuple[str, str, str] | None:
    bg = np.asarray(BACKGROUND, np.float32)
    dist = np.linalg.norm(pixels - bg, axis=-1)
    min_area = _MIN_AREA_FRACTION * cell * cell
    foreground = dist > _FOREGROUND_DISTANCE
    if foreground.sum() < min_area:
        return None
    d = dist[foreground]
    core = np.median(pixels[foreground][d >= np.median(d)], axis=0)
    colour_index = int(np.argmin(np.linalg.norm(_PALETTE - core, axis=-1)))
    direction = _PALETTE[colour_index] - bg
    alpha = np.clip(((pixels - bg) @ direction) / (direction @ direction), 0, 1)
    mask = alpha > 0.5
    if mask.sum() < min_area:
        return None
    shape, r = _best_shape(alpha, mask)
    # Half extents are 0.21 (small) and 0.37 (large) of a cell: split halfway.
    size = "large" if r > 0.29 * cell else "small"
    return COLOUR_NAMES[colour_index], shape, size


def parse_image(image: np.ndarray) -> list[ShapeObject]:
    """Objects in a rendered (or generated) image, in grid order. uint8 [0,255] or float [-1,1]."""
    pixels = _to_uint8_range(image)
    objects = []
    for position in POSITIONS:
        x0, y0, cell = _cell_box(position, pixels.shape[1])
        ys = slice(int(round(y0)), int(round(y0 + cell)))
        xs = slice(int(round(x0)), int(round(x0 + cell)))
        found = _parse_cell(pixels[ys, xs], cell)
        if found is not None:
            objects.append(ShapeObject(*found, position))
    return objects


def object_accuracy(truth: list[ShapeObject], parsed: list[ShapeObject]) -> tuple[int, int]:
    """(objects of `truth` found exactly in `parsed`, objects in truth + spurious parsed ones)."""
    right = len(set(truth) & set(parsed))
    spurious = len({o.position for o in parsed} - {o.position for o in truth})
    return right, len(truth) + spurious


def scene_batch(seed: int, split: str, start: int, n: int, size: int):
    """(images float32 [n, size, size, 3] in [-1, 1], scenes) of items start .. start+n-1 of a
    split: the autoencoder's training batches ("train") and held-out images ("heldout")."""
    scenes = [sample_scene(scene_rng(seed, split, i)) for i in range(start, start + n)]
    pixels = np.stack([render_scene(s, size) for s in scenes])
    return pixels.astype(np.float32) / 127.5 - 1.0, scenes
