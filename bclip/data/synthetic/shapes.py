"""The world's object classes: a painter per class that draws its silhouette with vectorised numpy,
its colour variants and caption nouns, and the class names and zero-shot prompt templates."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import numpy as np

TARGET_CLASS_NAME = "banana"

RGB = tuple[float, float, float]
# Canvases are channel-first float32 [3, h, w] (0-255) while drawing: numpy fills masked regions
# of a planar array several times faster than of an interleaved [h, w, 3] one.
# A painter draws one object into a canvas window [3, h, w] given the object's own coordinates
# u, v [h, w] there (centre at 0, radius about 1, v pointing down, everything within |u|, |v| <
# OBJECT_EXTENT), its jittered main colour [3] and a few uniform draws for painter-specific choices.
Painter = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray, Sequence[float]], None]
OBJECT_EXTENT = 1.25


# ----------------------------------------------------------------------------------------------
# Drawing helpers
# ----------------------------------------------------------------------------------------------


def _fill(canvas: np.ndarray, mask: np.ndarray, colour) -> None:
    """Paints colour [3] (or an image [3, h, w]) into canvas [3, h, w] where mask [h, w] is set."""
    colour = np.asarray(colour, np.float32)
    np.copyto(canvas, colour.reshape(3, 1, 1) if colour.ndim == 1 else colour, where=mask)


def _ellipse(u, v, centre_u, centre_v, radius_u, radius_v) -> np.ndarray:
    return ((u - centre_u) / radius_u) ** 2 + ((v - centre_v) / radius_v) ** 2 < 1.0


def _box(u, v, u_min, u_max, v_min, v_max) -> np.ndarray:
    return (u > u_min) & (u < u_max) & (v > v_min) & (v < v_max)


def _shade(colour, factor: float) -> np.ndarray:
    """Darker (factor < 1) or lighter (factor > 1, towards white) version of colour [3]."""
    colour = np.asarray(colour, np.float32)
    if factor <= 1.0:
        return colour * factor
    return colour + (255.0 - colour) * (factor - 1.0)


def _lattice_dots(u, v, spacing: float, radius: float, stagger: bool = True) -> np.ndarray:
    """Mask [h, w] of dots of `radius` on a (staggered) square lattice of `spacing`."""
    row = np.floor(v / spacing)
    shifted_u = u / spacing + (0.5 * (row % 2) if stagger else 0.0)
    local_u = shifted_u - np.floor(shifted_u) - 0.5
    local_v = v / spacing - row - 0.5
    return local_u**2 + local_v**2 < (radius / spacing) ** 2


# ----------------------------------------------------------------------------------------------
# One painter per class: each has its own silhouette and colour layout.
# ----------------------------------------------------------------------------------------------

_BROWN = (105, 65, 30)
_LEAF_GREEN = (60, 150, 45)
_WHITE = (245, 245, 240)
_BLACK = (25, 25, 25)


def _paint_apple(canvas, u, v, colour, details):
    _fill(canvas, (u**2 + (v - 0.1) ** 2 < 0.72) & ~_ellipse(u, v, 0.0, -0.78, 0.22, 0.2), colour)
    _fill(canvas, (np.abs(u + 0.08 * (v + 0.8)) < 0.06) & (v > -1.05) & (v < -0.6), _BROWN)
    _fill(canvas, _ellipse(u, v, 0.25, -0.88, 0.25, 0.11), _LEAF_GREEN)
    _fill(canvas, _ellipse(u, v, -0.35, -0.15, 0.13, 0.24), _shade(colour, 1.45))


def _paint_banana(canvas, u, v, colour, details):
    v = v + 0.25
    fruit = (u**2 + v**2 < 1.0) & (u**2 + (v + 0.4) ** 2 > 0.81)
    _fill(canvas, fruit, colour)
    if details[0] < 0.35:  # a ripe banana with brown speckles
        _fill(canvas, fruit & _lattice_dots(u + 0.3 * details[1], v, 0.3, 0.05), _shade(colour, 0.45))
    _fill(canvas, fruit & (np.abs(u) > 0.8), (90, 60, 25))


def _paint_pumpkin(canvas, u, v, colour, details):
    body = _ellipse(u, v, 0.0, 0.1, 1.0, 0.75)
    _fill(canvas, body, colour)
    _fill(canvas, body & (np.cos(u * 9.0) > 0.6), _shade(colour, 0.72))
    _fill(canvas, _box(u, v, -0.1, 0.1, -0.95, -0.55), (90, 110, 40))


def _paint_lemon(canvas, u, v, colour, details):
    tips = np.abs(v) < 0.5 * (1.12 - np.abs(u))  # a rhombus poking out of the ellipse's ends
    fruit = _ellipse(u, v, 0.0, 0.0, 0.95, 0.62) | tips
    _fill(canvas, fruit, colour)
    _fill(canvas, fruit & _lattice_dots(u, v, 0.22, 0.045), _shade(colour, 0.85))
    _fill(canvas, _ellipse(u, v, -0.3, -0.25, 0.3, 0.1), _shade(colour, 1.5))


def _paint_strawberry(canvas, u, v, colour, details):
    berry = (u**2 + (v + 0.1) ** 2 < 0.56) | ((v > -0.1) & (v < 1.0) & (np.abs(u) < 0.75 * (1.0 - v) / 1.1))
    _fill(canvas, berry, colour)
    _fill(canvas, berry & _lattice_dots(u, v, 0.26, 0.05), (245, 220, 90))
    crown = (v > -0.98) & (v < -0.62) & (np.abs(u) < 0.55) & ((np.cos(u * 14.0) > -0.1) | (v > -0.8))
    _fill(canvas, crown, _LEAF_GREEN)


def _paint_watermelon(canvas, u, v, colour, details):
    radius_squared = u**2 + (v + 0.45) ** 2
    slice_ = (v > -0.45) & (radius_squared < 1.3)
    _fill(canvas, slice_, (40, 125, 50))
    _fill(canvas, slice_ & (radius_squared < 1.05), (225, 240, 195))
    flesh = slice_ & (radius_squared < 0.92)
    _fill(canvas, flesh, colour)
    _fill(canvas, flesh & (radius_squared < 0.55) & _lattice_dots(u, v, 0.28, 0.045), _BLACK)


def _paint_grapes(canvas, u, v, colour, details):
    row = np.floor((v + 1.0) / 0.4)
    cluster = (row >= 0) & (row < 4) & (np.abs(u) < 0.95 - 0.22 * row)
    _fill(canvas, cluster & _lattice_dots(u + 0.2, v + 1.0, 0.4, 0.21), _shade(colour, 0.6))
    _fill(canvas, cluster & _lattice_dots(u + 0.2, v + 1.0, 0.4, 0.17), colour)
    _fill(canvas, _box(u, v, -0.05, 0.05, -1.2, -0.98), _BROWN)


def _paint_carrot(canvas, u, v, colour, details):
    along = (v + 0.7) / 1.75
    root = (along > 0) & (along < 1) & (np.abs(u) < 0.42 * (1.0 - along))
    _fill(canvas, root, colour)
    _fill(canvas, root & ((v * 6.0) % 1.0 < 0.16), _shade(colour, 0.75))
    top = (v < -0.7) & (v > -1.2)
    depth = v + 0.7
    leaves = top & ((np.abs(u) < 0.06) | (np.abs(u - 0.6 * depth) < 0.06) | (np.abs(u + 0.6 * depth) < 0.06))
    _fill(canvas, leaves, _LEAF_GREEN)


def _paint_mushroom(canvas, u, v, colour, details):
    _fill(canvas, (np.abs(u) < 0.24 + 0.06 * v) & (v > -0.1) & (v < 0.9), (235, 225, 200))
    cap = _ellipse(u, v, 0.0, -0.05, 1.0, 0.75) & (v < -0.05)
    _fill(canvas, cap, colour)
    _fill(canvas, cap & _lattice_dots(u + details[0], v, 0.42, 0.1), _WHITE)


def _paint_tree(canvas, u, v, colour, details):
    _fill(canvas, _box(u, v, -0.13, 0.13, 0.5, 1.05), _BROWN)
    along = (v + 1.05) / 1.6
    tier = np.floor(along * 3.0)
    half_width = (0.28 + 0.26 * tier) * (0.35 + 0.65 * (along * 3.0 - tier))
    _fill(canvas, (along > 0) & (along < 1) & (np.abs(u) < half_width), colour)


def _paint_house(canvas, u, v, colour, details):
    _fill(canvas, _box(u, v, -0.7, 0.7, -0.12, 0.95), colour)
    _fill(canvas, (v > -0.95) & (v < -0.1) & (np.abs(u) < 0.92 * (v + 0.95) / 0.85), (165, 45, 35))
    _fill(canvas, _box(u, v, 0.1, 0.4, 0.4, 0.95), (95, 55, 30))
    _fill(canvas, _box(u, v, -0.52, -0.18, 0.12, 0.45), (150, 200, 240))


def _paint_fish(canvas, u, v, colour, details):
    body = _ellipse(u, v, -0.2, 0.0, 0.75, 0.45)
    tail = (u > 0.42) & (u < 1.05) & (np.abs(v) < (u - 0.42) * 0.9)
    _fill(canvas, body | tail, colour)
    _fill(canvas, body & (np.cos((u + 0.2) * 11.0) > 0.72), _shade(colour, 1.7))
    _fill(canvas, _ellipse(u, v, -0.62, -0.1, 0.08, 0.08), _BLACK)


def _paint_star(canvas, u, v, colour, details):
    angle = np.arctan2(u, -v)  # 0 at the top point
    sector = ((angle + math.pi / 5) % (2 * math.pi / 5)) - math.pi / 5  # 0 along a point
    radius = np.sqrt(u**2 + v**2)
    along, across = radius * np.cos(sector), radius * np.abs(np.sin(sector))
    inner = 0.42
    edge_u, edge_v = inner * math.cos(math.pi / 5) - 1.0, inner * math.sin(math.pi / 5)
    star = edge_u * across - edge_v * (along - 1.0) > 0  # inside the tip-to-notch edge
    _fill(canvas, star, colour)
    _fill(canvas, star & (radius < 0.25), _shade(colour, 1.35))


def _paint_flower(canvas, u, v, colour, details):
    angle = np.arctan2(v, u) + details[0] * math.tau
    radius = np.sqrt(u**2 + v**2)
    _fill(canvas, radius < 0.5 + 0.5 * np.abs(np.cos(2.5 * angle)), colour)
    _fill(canvas, radius < 0.27, (245, 200, 40))


def _paint_heart(canvas, u, v, colour, details):
    x, y = u * 1.15, -v * 1.15 + 0.15
    heart = (x**2 + y**2 - 1.0) ** 3 - x**2 * y**3 < 0
    _fill(canvas, heart, colour)
    _fill(canvas, _ellipse(u, v, -0.45, -0.35, 0.17, 0.11), _shade(colour, 1.5))


def _paint_donut(canvas, u, v, colour, details):
    radius = np.sqrt(u**2 + v**2)
    angle = np.arctan2(v, u)
    _fill(canvas, (radius > 0.36) & (radius < 1.0), (205, 155, 85))
    icing = (radius > 0.44) & (radius < 0.84 + 0.07 * np.cos(9.0 * angle + details[0] * math.tau))
    _fill(canvas, icing, colour)
    sprinkles = icing & _lattice_dots(u + details[1], v, 0.25, 0.045)
    _fill(canvas, sprinkles, (70, 140, 230) if colour[2] > 150 else (250, 250, 250))


_BALL_PANELS = np.array(
    [(225, 35, 35), (250, 250, 250), (40, 90, 220), (250, 215, 30), (250, 250, 250), (40, 170, 70)],
    np.float32,
)


def _paint_ball(canvas, u, v, colour, details):
    radius_squared = u**2 + v**2
    panel = (np.floor((np.arctan2(v, u) / math.tau + details[0]) * 6.0) % 6).astype(np.int32)
    ball = radius_squared < 1.0
    _fill(canvas, ball, _BALL_PANELS.T[:, panel])
    _fill(canvas, radius_squared < 0.02, _WHITE)


# Which of the 3x3 pip positions are set on each face of a die.
_DIE_FACES = np.array(
    [
        [[0, 0, 0], [0, 1, 0], [0, 0, 0]],
        [[1, 0, 0], [0, 0, 0], [0, 0, 1]],
        [[1, 0, 0], [0, 1, 0], [0, 0, 1]],
        [[1, 0, 1], [0, 0, 0], [1, 0, 1]],
        [[1, 0, 1], [0, 1, 0], [1, 0, 1]],
        [[1, 0, 1], [1, 0, 1], [1, 0, 1]],
    ],
    bool,
)


def _paint_dice(canvas, u, v, colour, details):
    abs_u, abs_v = np.abs(u), np.abs(v)
    rounded_corner = (abs_u > 0.58) & (abs_v > 0.58) & ((abs_u - 0.58) ** 2 + (abs_v - 0.58) ** 2 > 0.04)
    _fill(canvas, (abs_u < 0.78) & (abs_v < 0.78) & ~rounded_corner, colour)
    column = np.clip(np.rint(u / 0.45), -1, 1)
    row = np.clip(np.rint(v / 0.45), -1, 1)
    near_pip = (u - 0.45 * column) ** 2 + (v - 0.45 * row) ** 2 < 0.13**2
    face = _DIE_FACES[min(int(details[0] * 6), 5)]
    pips = near_pip & face[(row + 1).astype(np.int32), (column + 1).astype(np.int32)]
    _fill(canvas, pips, _BLACK if colour.mean() > 150 else _WHITE)


_FLAG_SECOND_COLOURS = np.array([(250, 250, 250), (30, 30, 30), (245, 205, 30), (40, 80, 200)], np.float32)


def _paint_flag(canvas, u, v, colour, details):
    _fill(canvas, _box(u, v, -0.86, -0.74, -1.1, 1.1), (120, 120, 125))
    wave = v - 0.07 * np.sin(u * 4.0 + details[0] * math.tau)
    cloth = (u > -0.74) & (u < 1.05) & (wave > -1.0) & (wave < 0.2)
    stripe = np.floor((wave + 1.0) / 0.4)
    _fill(canvas, cloth, colour)
    _fill(canvas, cloth & (stripe == 1), _WHITE)
    _fill(canvas, cloth & (stripe >= 2), _FLAG_SECOND_COLOURS[int(details[1] * 4) % 4])


def _paint_key(canvas, u, v, colour, details):
    bow_distance_squared = (u + 0.6) ** 2 + v**2
    bow = (bow_distance_squared > 0.04) & (bow_distance_squared < 0.2)
    shaft = _box(u, v, -0.25, 1.05, -0.12, 0.12)
    teeth = _box(u, v, 0.5, 1.0, 0.0, 0.36) & ((u * 7.0) % 1.0 < 0.6)
    _fill(canvas, bow | shaft | teeth, colour)
    _fill(canvas, shaft & (np.abs(v + 0.04) < 0.03), _shade(colour, 1.4))


def _paint_umbrella(canvas, u, v, colour, details):
    _fill(canvas, _box(u, v, -0.05, 0.05, -0.1, 0.85), (60, 45, 35))
    hook_distance_squared = (u - 0.17) ** 2 + (v - 0.85) ** 2
    _fill(canvas, (v > 0.85) & (hook_distance_squared > 0.014) & (hook_distance_squared < 0.05), (60, 45, 35))
    canopy = (u**2 + v**2 < 1.0) & (v < -0.13 * np.abs(np.sin(u * 7.85)))
    _fill(canvas, canopy, colour)
    panel = np.floor(np.arctan2(v, u) * 8.0 / math.pi) % 2 == 0
    _fill(canvas, canopy & panel, _shade(colour, 1.3))


def _paint_clock(canvas, u, v, colour, details):
    radius_squared = u**2 + v**2
    _fill(canvas, radius_squared < 1.0, colour)
    _fill(canvas, radius_squared < 0.72, _WHITE)
    ticks = (radius_squared > 0.42) & (radius_squared < 0.64) & ((np.abs(u) < 0.05) | (np.abs(v) < 0.05))
    _fill(canvas, ticks, _BLACK)
    for fraction, length, half_width in ((details[0], 0.42, 0.06), (details[1], 0.66, 0.04)):
        direction_u, direction_v = math.sin(fraction * math.tau), -math.cos(fraction * math.tau)
        along = u * direction_u + v * direction_v
        across = np.abs(u * direction_v - v * direction_u)
        _fill(canvas, (along > -0.05) & (along < length) & (across < half_width), _BLACK)


def _paint_leaf(canvas, u, v, colour, details):
    blade = ((u - 0.55) ** 2 + v**2 < 1.1) & ((u + 0.55) ** 2 + v**2 < 1.1) & (v < 0.85)
    _fill(canvas, blade, colour)
    _fill(canvas, blade & (np.abs(u) < 0.035), _shade(colour, 0.6))
    _fill(canvas, _box(u, v, -0.04, 0.04, 0.7, 1.15), _shade(colour, 0.6))


def _paint_kite(canvas, u, v, colour, details):
    v = v + 0.35
    upper = (v < 0) & (np.abs(u) / 0.65 + np.abs(v) / 0.55 < 1.0)
    lower = (v >= 0) & (np.abs(u) / 0.65 + v / 0.95 < 1.0)
    kite = upper | lower
    _fill(canvas, kite, colour)
    _fill(canvas, kite & ((u > 0) ^ (v > 0)), (250, 220, 50) if colour[0] < 150 else _WHITE)
    _fill(canvas, kite & ((np.abs(u) < 0.025) | (np.abs(v) < 0.025)), (60, 45, 35))
    tail = (v > 0.95) & (v < 1.5) & (np.abs(u - 0.1 * np.sin(v * 14.0)) < 0.04)
    _fill(canvas, tail, (60, 45, 35))


# ----------------------------------------------------------------------------------------------
# The classes
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ColourVariant:
    """One colouring of a class: its main RGB colour, the words a caption may use for it, and how
    often it occurs relative to the class's other variants."""

    rgb: RGB
    words: tuple[str, ...]
    weight: float = 1.0


@dataclasses.dataclass(frozen=True)
class ObjectClass:
    """A class of the world: its zero-shot name, the noun phrases captions use for it (each
    containing the name or a synonym), its painter and colourings, and how far it may rotate."""

    name: str
    nouns: tuple[str, ...]
    painter: Painter
    colours: tuple[ColourVariant, ...]
    max_rotation: float = 0.35


def _colour(rgb, *words, weight=1.0) -> ColourVariant:
    return ColourVariant(tuple(float(c) for c in rgb), tuple(words), weight)


CLASSES: tuple[ObjectClass, ...] = (
    ObjectClass("apple", ("apple",), _paint_apple, (
        _colour((205, 25, 30), "red", "crimson", weight=3),
        _colour((120, 200, 50), "green"),
    )),
    ObjectClass("banana", ("banana",), _paint_banana, (
        _colour((245, 215, 45), "yellow", "golden", weight=4),
        _colour((150, 200, 60), "green", "unripe"),
    ), max_rotation=0.8),
    ObjectClass("pumpkin", ("pumpkin",), _paint_pumpkin, (
        _colour((240, 125, 20), "orange"),
    )),
    ObjectClass("lemon", ("lemon",), _paint_lemon, (
        _colour((250, 240, 120), "yellow", "pale"),
    ), max_rotation=0.8),
    ObjectClass("strawberry", ("strawberry",), _paint_strawberry, (
        _colour((220, 30, 55), "red", "ripe"),
    )),
    ObjectClass("watermelon", ("watermelon", "slice of watermelon"), _paint_watermelon, (
        _colour((240, 70, 80), "red", "pink", "juicy"),
    )),
    ObjectClass("grapes", ("bunch of grapes", "cluster of grapes"), _paint_grapes, (
        _colour((115, 45, 145), "purple", "violet", weight=3),
        _colour((160, 205, 85), "green"),
    )),
    ObjectClass("carrot", ("carrot",), _paint_carrot, (
        _colour((245, 120, 25), "orange"),
    )),
    ObjectClass("mushroom", ("mushroom", "toadstool"), _paint_mushroom, (
        _colour((210, 35, 30), "red", "spotted", weight=2),
        _colour((150, 95, 55), "brown"),
    )),
    ObjectClass("tree", ("tree", "pine tree", "fir tree"), _paint_tree, (
        _colour((35, 125, 50), "green", "dark"),
    )),
    ObjectClass("house", ("house", "cottage"), _paint_house, (
        _colour((240, 238, 228), "white"),
        _colour((235, 205, 130), "yellow"),
        _colour((140, 175, 225), "blue"),
    )),
    ObjectClass("fish", ("fish",), _paint_fish, (
        _colour((40, 95, 225), "blue", "striped", weight=2),
        _colour((250, 125, 20), "orange", "striped"),
    ), max_rotation=0.6),
    ObjectClass("star", ("star",), _paint_star, (
        _colour((250, 195, 25), "golden", "yellow", "gold"),
    ), max_rotation=math.pi),
    ObjectClass("flower", ("flower", "blossom"), _paint_flower, (
        _colour((240, 115, 180), "pink"),
        _colour((150, 75, 205), "purple", "violet"),
        _colour((248, 248, 248), "white"),
    )),
    ObjectClass("heart", ("heart",), _paint_heart, (
        _colour((235, 70, 150), "pink", weight=2),
        _colour((205, 20, 45), "red", "crimson"),
    )),
    ObjectClass("donut", ("donut", "doughnut"), _paint_donut, (
        _colour((240, 130, 180), "pink", weight=2),
        _colour((110, 60, 30), "chocolate", "brown"),
        _colour((248, 244, 232), "white"),
    ), max_rotation=math.pi),
    ObjectClass("ball", ("ball", "beach ball"), _paint_ball, (
        _colour((225, 35, 35), "colorful", "striped"),
    ), max_rotation=math.pi),
    ObjectClass("dice", ("dice", "die"), _paint_dice, (
        _colour((245, 245, 238), "white", weight=2),
        _colour((205, 30, 30), "red"),
    ), max_rotation=math.pi),
    ObjectClass("flag", ("flag", "banner"), _paint_flag, (
        _colour((205, 30, 35), "red"),
        _colour((40, 75, 190), "blue"),
        _colour((30, 145, 60), "green"),
    )),
    ObjectClass("key", ("key",), _paint_key, (
        _colour((215, 175, 50), "golden", "brass", "gold", weight=2),
        _colour((175, 178, 188), "silver", "gray"),
    ), max_rotation=math.pi),
    ObjectClass("umbrella", ("umbrella", "parasol"), _paint_umbrella, (
        _colour((200, 30, 40), "red"),
        _colour((45, 80, 200), "blue"),
        _colour((130, 50, 170), "purple"),
    )),
    ObjectClass("clock", ("clock", "wall clock"), _paint_clock, (
        _colour((30, 30, 35), "black", "round", weight=2),
        _colour((200, 40, 40), "red", "round"),
        _colour((40, 75, 180), "blue", "round"),
    )),
    ObjectClass("leaf", ("leaf",), _paint_leaf, (
        _colour((55, 160, 45), "green", weight=3),
        _colour((225, 115, 25), "orange", "autumn"),
        _colour((175, 40, 30), "red", "autumn"),
    ), max_rotation=math.pi),
    ObjectClass("kite", ("kite",), _paint_kite, (
        _colour((210, 30, 40), "red"),
        _colour((40, 85, 210), "blue"),
        _colour((35, 150, 65), "green"),
    ), max_rotation=0.5),
)
NUM_CLASSES = len(CLASSES)
TARGET_LABEL = [object_class.name for object_class in CLASSES].index(TARGET_CLASS_NAME)

# Zero-shot prompt templates for the world (a handful in the style of CLIP's ImageNet prompts).
PROMPT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a picture of a {}.",
    "a rendering of a {}.",
    "a drawing of the {}.",
    "a close-up photo of a {}.",
    "a photo of the small {}.",
    "a photo of the large {}.",
)


def class_names(num_classes: int = NUM_CLASSES) -> list[str]:
    """Zero-shot class names; entry i is the name of class i."""
    _check_num_classes(num_classes)
    return [object_class.name for object_class in CLASSES[:num_classes]]


def prompt_templates() -> list[str]:
    """Zero-shot prompt templates, each with one "{}" where the class name goes."""
    return list(PROMPT_TEMPLATES)


def _check_num_classes(num_classes: int) -> None:
    if not TARGET_LABEL < num_classes <= NUM_CLASSES:
        raise ValueError(f"num_classes must be in [{TARGET_LABEL + 1}, {NUM_CLASSES}] to include "
                         f"{TARGET_CLASS_NAME!r}, got {num_classes}")

