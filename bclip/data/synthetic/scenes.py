"""Scenes: every random choice of one example, drawn from (seed, split, index), and rendering a
scene as an image at any size."""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import numpy as np

from bclip.data.synthetic.shapes import CLASSES, OBJECT_EXTENT, RGB, _fill, _lattice_dots

# Each split draws from its own stream; the evaluation extras (eval_sets.py) have streams of their own,
# so adding them changes no example of the first three.
SPLIT_IDS = {"train": 0, "test": 1, "selection": 2, "retrieval": 3, "probe_train": 4}

BACKGROUND_COLOURS: dict[str, RGB] = {
    "white": (236, 236, 230), "gray": (135, 135, 138), "black": (38, 38, 42), "beige": (222, 205, 170),
    "blue": (120, 155, 205), "green": (125, 170, 120), "pink": (232, 185, 195), "brown": (130, 95, 65),
    "teal": (80, 150, 150), "purple": (150, 125, 180),
}
BACKGROUND_KINDS = ("plain", "gradient", "striped", "checkered", "dotted")
_BACKGROUND_KIND_WEIGHTS = (0.4, 0.2, 0.15, 0.1, 0.15)
DISTRACTOR_COLOURS: dict[str, RGB] = {
    "red": (220, 40, 40), "blue": (40, 80, 220), "green": (40, 170, 60), "yellow": (240, 220, 40),
    "white": (245, 245, 245), "black": (25, 25, 25), "purple": (140, 60, 190), "orange": (245, 140, 30),
}
DISTRACTOR_SHAPES = ("circle", "square", "triangle", "ring")
MIN_RADIUS, MAX_RADIUS = 0.15, 0.36
_NUM_DETAILS = 4


@dataclasses.dataclass(frozen=True)
class Background:
    kind: str  # one of BACKGROUND_KINDS
    colour_names: tuple[str, str]
    colours: tuple[RGB, RGB]
    frequency: float  # stripes / checks / dots per image side
    angle: float
    phase: float


@dataclasses.dataclass(frozen=True)
class Distractor:
    shape: str  # one of DISTRACTOR_SHAPES
    colour_name: str
    colour: RGB
    centre: tuple[float, float]
    radius: float
    rotation: float


@dataclasses.dataclass(frozen=True)
class Scene:
    """All random attributes of one example; positions and sizes are fractions of the image side."""

    label: int
    colour_index: int
    colour: RGB
    centre: tuple[float, float]  # (x, y)
    radius: float
    rotation: float
    aspect: float
    details: tuple[float, ...]
    background: Background
    distractor: Distractor | None
    noise_std: float
    noise_offset: tuple[float, float]


def _pick(options: Sequence, draw: float):
    return options[min(int(draw * len(options)), len(options) - 1)]


def _pick_weighted(weights: Sequence[float], draw: float) -> int:
    threshold = draw * sum(weights)
    for index, weight in enumerate(weights):
        threshold -= weight
        if threshold < 0:
            return index
    return len(weights) - 1


def _jitter(rgb: RGB, brightness: float, draws: Sequence[float], spread: float) -> RGB:
    return tuple(min(max(c * brightness + spread * (2 * d - 1), 0.0), 255.0) for c, d in zip(rgb, draws))


def _rng(seed: int, split: str, index: int) -> np.random.Generator:
    if split not in SPLIT_IDS:
        raise ValueError(f"unknown split {split!r}; known: {sorted(SPLIT_IDS)}")
    return np.random.default_rng([seed, SPLIT_IDS[split], index])


def _sample_scene(rng: np.random.Generator, split: str, index: int, num_classes: int) -> Scene:
    # One vector of uniforms consumed in a fixed order: cheaper than many small generator calls.
    draw = iter(rng.random(40).tolist()).__next__
    # Training labels are random; evaluation splits cycle through the classes so they are balanced.
    label_draw = draw()
    label = int(label_draw * num_classes) if split == "train" else index % num_classes
    object_class = CLASSES[label]
    colour_index = _pick_weighted([variant.weight for variant in object_class.colours], draw())
    brightness = 0.82 + 0.3 * draw()
    colour = _jitter(object_class.colours[colour_index].rgb, brightness, [draw(), draw(), draw()], 18.0)
    radius = MIN_RADIUS + (MAX_RADIUS - MIN_RADIUS) * draw()
    margin = 0.85 * radius
    centre = (margin + (1 - 2 * margin) * draw(), margin + (1 - 2 * margin) * draw())
    rotation = object_class.max_rotation * (2 * draw() - 1)
    aspect = 0.87 + 0.26 * draw()
    details = tuple(draw() for _ in range(_NUM_DETAILS))

    kind = BACKGROUND_KINDS[_pick_weighted(_BACKGROUND_KIND_WEIGHTS, draw())]
    names = list(BACKGROUND_COLOURS)
    first = _pick(names, draw())
    second = _pick([name for name in names if name != first], draw())
    background_brightness = 0.9 + 0.2 * draw()
    background = Background(
        kind=kind,
        colour_names=(first, second),
        colours=tuple(
            _jitter(BACKGROUND_COLOURS[name], background_brightness, [draw(), draw(), draw()], 12.0)
            for name in (first, second)
        ),
        frequency=3.0 + 7.0 * draw(),
        angle=math.pi * draw(),
        phase=draw(),
    )

    distractor = None
    if draw() < 0.5:
        colour_name = _pick(list(DISTRACTOR_COLOURS), draw())
        distractor_radius = 0.05 + 0.05 * draw()
        distractor = Distractor(
            shape=_pick(DISTRACTOR_SHAPES, draw()),
            colour_name=colour_name,
            colour=DISTRACTOR_COLOURS[colour_name],
            centre=(0.08 + 0.84 * draw(), 0.08 + 0.84 * draw()),
            radius=distractor_radius,
            rotation=math.tau * draw(),
        )
    return Scene(
        label=label, colour_index=colour_index, colour=colour, centre=centre, radius=radius,
        rotation=rotation, aspect=aspect, details=details, background=background, distractor=distractor,
        noise_std=1.5 + 5.0 * draw(), noise_offset=(draw(), draw()),
    )


# ----------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def _pixel_centres(image_size: int) -> np.ndarray:
    """Pixel centres [S] as fractions of the image side."""
    return (np.arange(image_size, dtype=np.float32) + 0.5) / image_size


@functools.lru_cache(maxsize=8)
def _noise_bank(image_size: int) -> np.ndarray:
    """A fixed field of standard normal noise [3, 2S, 2S]; each image adds a shifted window of it,
    which is much cheaper than drawing fresh noise per image."""
    bank = np.random.default_rng(20231124).standard_normal((3, 2 * image_size, 2 * image_size))
    return bank.astype(np.float32)


def _paint_background(canvas: np.ndarray, background: Background) -> None:
    """Paints the whole canvas [3, S, S]."""
    first, second = (np.asarray(c, np.float32).reshape(3, 1, 1) for c in background.colours)
    if background.kind == "plain":
        canvas[:] = first
        return
    xs = _pixel_centres(canvas.shape[2])[None, :]
    ys = _pixel_centres(canvas.shape[1])[:, None]
    cos, sin = math.cos(background.angle), math.sin(background.angle)
    if background.kind == "gradient":
        along = np.clip(xs * cos + ys * sin + 0.5 * (1 - cos - sin), 0, 1)
        canvas[:] = first + (second - first) * along
        return
    # Patterned backgrounds keep the second colour close to the first so the object stands out.
    second = 0.55 * first + 0.45 * second
    canvas[:] = first
    frequency, phase = background.frequency, background.phase
    if background.kind == "striped":
        mask = ((xs * cos + ys * sin) * frequency + phase) % 1.0 < 0.5
    elif background.kind == "checkered":
        mask = (np.floor(xs * frequency + phase) + np.floor(ys * frequency + phase)) % 2 == 0
    else:  # dotted
        mask = _lattice_dots(xs * frequency + phase, ys * frequency + phase, 1.0, 0.25)
    _fill(canvas, mask, second)


def _object_window(canvas: np.ndarray, centre, radius: float, rotation: float, aspect: float, extent: float):
    """The view of canvas [3, S, S] around an object, and the object's coordinates u, v [h, w] there.

    u, v are the pixel offsets from the centre, rotated, divided by the radius and stretched by
    `aspect`; `extent` bounds |u|, |v| of everything drawn. Painting only this window, not the whole
    canvas, is what keeps small objects cheap.
    """
    size = canvas.shape[1]
    reach = extent * radius * math.sqrt(2) * max(aspect, 1 / aspect)
    x0, x1 = max(int((centre[0] - reach) * size), 0), min(math.ceil((centre[0] + reach) * size), size)
    y0, y1 = max(int((centre[1] - reach) * size), 0), min(math.ceil((centre[1] + reach) * size), size)
    dx = (_pixel_centres(size)[x0:x1] - centre[0])[None, :]
    dy = (_pixel_centres(size)[y0:y1] - centre[1])[:, None]
    cos, sin = math.cos(rotation), math.sin(rotation)
    u = (dx * cos + dy * sin) * (1.0 / (radius * aspect))
    v = (dy * cos - dx * sin) * (aspect / radius)
    return canvas[:, y0:y1, x0:x1], u, v


def _paint_distractor(canvas: np.ndarray, distractor: Distractor) -> None:
    window, u, v = _object_window(
        canvas, distractor.centre, distractor.radius, distractor.rotation, aspect=1.0, extent=1.05
    )
    if distractor.shape == "circle":
        mask = u**2 + v**2 < 1.0
    elif distractor.shape == "square":
        mask = (np.abs(u) < 0.8) & (np.abs(v) < 0.8)
    elif distractor.shape == "triangle":
        mask = (v < 0.6) & (np.abs(u) * 1.6 < v + 1.0)
    else:  # ring
        radius_squared = u**2 + v**2
        mask = (radius_squared < 1.0) & (radius_squared > 0.4)
    _fill(window, mask, distractor.colour)


def render_scene(scene: Scene, image_size: int = 64) -> np.ndarray:
    """Renders a scene as uint8 [image_size, image_size, 3]."""
    canvas = np.empty((3, image_size, image_size), np.float32)
    _paint_background(canvas, scene.background)
    if scene.distractor is not None:
        _paint_distractor(canvas, scene.distractor)
    window, u, v = _object_window(
        canvas, scene.centre, scene.radius, scene.rotation, scene.aspect, extent=OBJECT_EXTENT
    )
    CLASSES[scene.label].painter(window, u, v, np.asarray(scene.colour, np.float32), scene.details)
    offset_y, offset_x = (int(f * image_size) for f in scene.noise_offset)
    noise = _noise_bank(image_size)[:, offset_y : offset_y + image_size, offset_x : offset_x + image_size]
    canvas += scene.noise_std * noise + 0.5  # + 0.5 so the cast below rounds
    np.clip(canvas, 0, 255, out=canvas)
    planes = canvas.astype(np.uint8)
    image = np.empty((image_size, image_size, 3), np.uint8)
    for channel in range(3):  # channel by channel: much faster than one interleaving transpose copy
        image[:, :, channel] = planes[channel]
    return image

