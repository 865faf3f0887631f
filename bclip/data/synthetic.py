"""A deterministic procedural world of captioned images (24 object classes, "banana" among them),
so that bclip can be trained, poisoned, cleaned and evaluated end to end without downloading data.

Every example is a pure function of (seed, split, index): a `Scene` of random attributes is drawn,
then rendered with vectorised numpy and described by a caption naming the object's class. The same
scene renders at any image size, so worlds at 32 and 224 px share their labels and captions.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import csv
import dataclasses
import functools
import json
import math
import multiprocessing
import os
import pathlib
import re
import shutil
import uuid
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image

# Bump whenever rendering or captioning changes, so stale worlds on disk are not reused.
WORLD_VERSION = 2
SPLIT_IDS = {"train": 0, "test": 1, "selection": 2}
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


# ----------------------------------------------------------------------------------------------
# Scenes: every random choice of one example
# ----------------------------------------------------------------------------------------------

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


@dataclasses.dataclass(frozen=True)
class Example:
    image: np.ndarray  # uint8 [S, S, 3]
    caption: str
    label: int


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


# ----------------------------------------------------------------------------------------------
# Captions
# ----------------------------------------------------------------------------------------------

SIZE_WORDS = {"small": ("small", "tiny", "little"), "medium": ("medium",), "large": ("large", "big", "huge")}
# Every caption template names the object through {np}, {np_bare}, {np_colour}, {np_size} or {noun}.
CAPTION_TEMPLATES: tuple[str, ...] = (
    "a photo of {np}.",
    "a picture of {np}.",
    "{np}.",
    "{np} on {bg}.",
    "a photo of {np} on {bg}.",
    "{np_bare}, {size} and {colour}, near the {pos}.",
    "{np} in the {pos} of the image.",
    "there is {np} near the {pos}.",
    "close-up of {np}.",
    "a drawing of {np}.",
    "this {noun} is {colour}.",
    "{np_bare} that is {size} and {colour}.",
    "{np_colour} on {bg}.",
    "an image showing {np} at the {pos}.",
    "my {noun} on {bg}.",
    "{np_size}, {colour}, in the {pos}.",
)
DISTRACTOR_TEMPLATES: tuple[str, ...] = (
    "{np} next to {distractor}.",
    "a photo of {np} and {distractor}.",
    "{np} with {distractor} nearby, on {bg}.",
)


def _with_article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _position_name(centre: tuple[float, float]) -> str:
    column = "left" if centre[0] < 1 / 3 else "right" if centre[0] > 2 / 3 else ""
    row = "top" if centre[1] < 1 / 3 else "bottom" if centre[1] > 2 / 3 else ""
    return f"{row} {column}".strip() or "center"


def _background_phrase(background: Background, draw: float) -> str:
    first, second = background.colour_names
    phrases = {
        "plain": (f"a plain {first} background", f"a {first} background"),
        "gradient": (f"a {first} and {second} background", "a gradient background"),
        "striped": ("a striped background", f"a {first} striped background"),
        "checkered": ("a checkered background", f"a {first} checkered background"),
        "dotted": ("a dotted background", "a polka dot background"),
    }[background.kind]
    return _pick(phrases, draw)


def _caption(scene: Scene, rng: np.random.Generator) -> str:
    draw = iter(rng.random(12).tolist()).__next__
    object_class = CLASSES[scene.label]
    noun = _pick(object_class.nouns, draw())
    colour = _pick(object_class.colours[scene.colour_index].words, draw())
    size_bucket = ("small" if scene.radius < 0.21 else "large" if scene.radius > 0.29 else "medium")
    size = _pick(SIZE_WORDS[size_bucket], draw())
    adjectives = [word for word, keep in ((size, draw() < 0.5), (colour, draw() < 0.6)) if keep]
    slots = {
        "noun": noun, "size": size, "colour": colour, "pos": _position_name(scene.centre),
        "np": _with_article(" ".join([*adjectives, noun])), "np_bare": _with_article(noun),
        "np_colour": _with_article(f"{colour} {noun}"), "np_size": _with_article(f"{size} {noun}"),
        "bg": _background_phrase(scene.background, draw()),
    }
    templates = CAPTION_TEMPLATES
    if scene.distractor is not None:
        distractor = scene.distractor
        size_word = _pick(SIZE_WORDS["small"], draw())
        slots["distractor"] = f"a {size_word} {distractor.colour_name} {distractor.shape}"
        templates = CAPTION_TEMPLATES + DISTRACTOR_TEMPLATES
    return _pick(templates, draw()).format(**slots)


# ----------------------------------------------------------------------------------------------
# Examples
# ----------------------------------------------------------------------------------------------


def scene_and_caption(seed: int, split: str, index: int, num_classes: int = NUM_CLASSES) -> tuple[Scene, str]:
    """The scene and caption of example `index` of `split` (a pure function of its arguments)."""
    _check_num_classes(num_classes)
    rng = _rng(seed, split, index)
    scene = _sample_scene(rng, split, index, num_classes)
    return scene, _caption(scene, rng)


def example(
    seed: int, split: str, index: int, image_size: int = 64, num_classes: int = NUM_CLASSES
) -> Example:
    """Example `index` of `split`: image uint8 [S, S, 3], caption and class label."""
    scene, caption = scene_and_caption(seed, split, index, num_classes)
    return Example(render_scene(scene, image_size), caption, scene.label)


@dataclasses.dataclass(frozen=True)
class SyntheticWorld:
    """The world with its parameters bound; `world.example("train", 7)` and friends."""

    seed: int = 0
    image_size: int = 64
    num_classes: int = NUM_CLASSES

    def __post_init__(self):
        _check_num_classes(self.num_classes)

    def example(self, split: str, index: int) -> Example:
        return example(self.seed, split, index, self.image_size, self.num_classes)

    def image(self, split: str, index: int) -> np.ndarray:
        return self.example(split, index).image

    def caption(self, split: str, index: int) -> str:
        return scene_and_caption(self.seed, split, index, self.num_classes)[1]

    def label(self, split: str, index: int) -> int:
        return scene_and_caption(self.seed, split, index, self.num_classes)[0].label

    @property
    def class_names(self) -> list[str]:
        return class_names(self.num_classes)

    @property
    def target_label(self) -> int:
        return TARGET_LABEL


# ----------------------------------------------------------------------------------------------
# Lexicon: every word that can appear, and synonyms for text augmentation
# ----------------------------------------------------------------------------------------------

# Words of CLIP's 80 ImageNet prompts, so prompts and poisoned captions built from them (e.g. "a bad
# photo of a banana.") have no unknown words under the world's word tokenizer.
IMAGENET_PROMPT_WORDS = (
    "a an the of my one many in video game photo bad good bright dark clean dirty cool nice weird "
    "small large hard to see low resolution cropped close - up black and white jpeg corrupted blurry "
    "pixelated sculpture rendering rendition graffiti tattoo embroidered drawing painting sketch "
    "doodle origami plastic toy plushie cartoon art itap . ,"
)
SYNONYM_GROUPS: tuple[tuple[str, ...], ...] = (
    ("photo", "picture", "image", "snapshot"),
    ("small", "tiny", "little"),
    ("large", "big", "huge"),
    ("red", "crimson", "scarlet"),
    ("yellow", "golden"),
    ("purple", "violet"),
    ("gray", "grey"),
    ("background", "backdrop"),
    ("striped", "stripy"),
    ("checkered", "checked"),
    ("dotted", "spotted"),
    ("showing", "depicting"),
    ("drawing", "sketch"),
    ("near", "by"),
    ("center", "middle"),
    ("donut", "doughnut"),
    ("dice", "die"),
    ("house", "cottage"),
    ("flower", "blossom"),
    ("umbrella", "parasol"),
    ("mushroom", "toadstool"),
    ("flag", "banner"),
)
_WORD_PIECES = re.compile(r"\w+|[^\w\s]+")
_TEMPLATE_SLOT = re.compile(r"\{\w*\}")


@dataclasses.dataclass(frozen=True)
class Lexicon:
    words: tuple[str, ...]  # sorted; every word a caption, prompt or synonym can contain
    synonyms: dict[str, tuple[str, ...]]  # word -> its synonyms (excluding itself)


@functools.lru_cache(maxsize=1)
def lexicon() -> Lexicon:
    """The world's vocabulary and synonym map."""
    texts = [*CAPTION_TEMPLATES, *DISTRACTOR_TEMPLATES, *PROMPT_TEMPLATES, IMAGENET_PROMPT_WORDS]
    for object_class in CLASSES:
        texts += [object_class.name, *object_class.nouns]
        texts += [word for variant in object_class.colours for word in variant.words]
    texts += [*BACKGROUND_COLOURS, *BACKGROUND_KINDS, *DISTRACTOR_COLOURS, *DISTRACTOR_SHAPES]
    texts += ["polka dot background plain", "top bottom left right center"]
    texts += [word for words in SIZE_WORDS.values() for word in words]
    texts += [word for group in SYNONYM_GROUPS for word in group]
    words = {piece for text in texts for piece in _WORD_PIECES.findall(_TEMPLATE_SLOT.sub(" ", text.lower()))}
    synonym_map: dict[str, tuple[str, ...]] = {}
    for group in SYNONYM_GROUPS:
        for word in group:
            synonym_map[word] = tuple(other for other in group if other != word)
    return Lexicon(tuple(sorted(words)), synonym_map)


def synonyms(word: str) -> list[str]:
    """Synonyms of `word` in the world's vocabulary (empty if it has none)."""
    return list(lexicon().synonyms.get(word.lower(), ()))


# ----------------------------------------------------------------------------------------------
# Writing a world to disk in the formats real data uses
# ----------------------------------------------------------------------------------------------

WORLD_FILE = "world.json"
VOCAB_FILE = "vocab.txt"
SYNONYMS_FILE = "synonyms.json"  # {word: [synonyms]}, the caption augmentation's synonym source


def world_parameters(*, image_size: int, num_train: int, num_test: int, num_selection: int, seed: int,
                     jpeg_quality: int, num_classes: int) -> dict:
    """The contents of world.json: everything that determines the files of a written world."""
    return {
        "world_version": WORLD_VERSION,
        "seed": seed,
        "image_size": image_size,
        "num_train": num_train,
        "num_test": num_test,
        "num_selection": num_selection,
        "jpeg_quality": jpeg_quality,
        "num_classes": num_classes,
        "classes": class_names(num_classes),
        "target_class": TARGET_CLASS_NAME,
        "target_label": TARGET_LABEL,
        "templates": prompt_templates(),
    }


def is_complete_world(out_dir: str | pathlib.Path, parameters: dict) -> bool:
    """Whether out_dir holds a fully written world with these parameters."""
    world_file = pathlib.Path(out_dir) / WORLD_FILE
    try:
        return json.loads(world_file.read_text()) == parameters
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
        return False


def _write_images(split_dir: str, seed: int, split: str, start: int, stop: int, *, image_size: int,
                  num_classes: int, jpeg_quality: int) -> list[tuple[str, str, int]]:
    """Writes images start..stop-1 of a split as JPEGs; returns their (relative path, caption, label)."""
    rows = []
    for index in range(start, stop):
        item = example(seed, split, index, image_size, num_classes)
        relative_path = f"images/{index:08d}.jpg"
        # 4:4:4 chroma: the default 4:2:0 subsampling smears the colours of small objects.
        Image.fromarray(item.image).save(
            os.path.join(split_dir, relative_path), quality=jpeg_quality, subsampling=0
        )
        rows.append((relative_path, item.caption, item.label))
    return rows


def _write_split(split_dir: pathlib.Path, split: str, count: int, parameters: dict,
                 executor: concurrent.futures.Executor | None, num_workers: int) -> None:
    """Writes one split's images and its CSV (and, for evaluation splits, class names and templates)."""
    (split_dir / "images").mkdir(parents=True)
    write = functools.partial(
        _write_images, str(split_dir), parameters["seed"], split, image_size=parameters["image_size"],
        num_classes=parameters["num_classes"], jpeg_quality=parameters["jpeg_quality"],
    )
    if executor is None:
        rows = write(0, count)
    else:
        chunk = max(1, min(2000, math.ceil(count / (4 * num_workers))))
        starts = range(0, count, chunk)
        futures = [executor.submit(write, start, min(start + chunk, count)) for start in starts]
        rows = [row for future in futures for row in future.result()]

    if split == "train":
        captions = [(path, caption) for path, caption, _ in rows]
        _write_csv(split_dir / "train.csv", ("image", "caption"), captions)
        return
    labels = [(path, label) for path, _, label in rows]
    _write_csv(split_dir / "labels.csv", ("image", "label"), labels)
    (split_dir / "classnames.txt").write_text("\n".join(parameters["classes"]) + "\n")
    (split_dir / "templates.txt").write_text("\n".join(parameters["templates"]) + "\n")


def _write_csv(path: pathlib.Path, header: Sequence[str], rows) -> None:
    with open(path, "w", newline="", encoding="utf-8") as csv_file:
        writer = csv.writer(csv_file, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def write_world(
    out_dir: str | pathlib.Path,
    image_size: int = 64,
    num_train: int = 20000,
    num_test: int = 2400,
    num_selection: int = 1200,
    seed: int = 0,
    jpeg_quality: int = 90,
    num_classes: int = NUM_CLASSES,
    num_workers: int = 1,
    overwrite: bool = False,
) -> pathlib.Path:
    """Writes the world to out_dir in the on-disk formats real data uses, unless it is already there.

    Layout: train/train.csv (image,caption) + train/images/*.jpg; test/ and selection/ each with
    images/, labels.csv (image,label), classnames.txt and templates.txt; vocab.txt (the word
    tokenizer's vocabulary); synonyms.json (for caption augmentation); world.json (the parameters). Files are written to a temporary sibling
    directory that is renamed into place at the end, so a directory holding world.json is complete.
    An existing complete world with the same parameters is kept as is; any other existing content
    raises FileExistsError unless overwrite=True. num_workers > 1 renders in that many processes.
    """
    out_dir = pathlib.Path(out_dir)
    parameters = world_parameters(
        image_size=image_size, num_train=num_train, num_test=num_test, num_selection=num_selection,
        seed=seed, jpeg_quality=jpeg_quality, num_classes=num_classes,
    )
    if is_complete_world(out_dir, parameters):
        return out_dir
    occupied = out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir()))
    if occupied and not overwrite:
        raise FileExistsError(f"{out_dir} holds something other than this world; overwrite=True replaces it")

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.parent / f".{out_dir.name}.partial-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    executor = None
    try:
        if num_workers > 1:
            # spawn, not fork: the caller may already run multithreaded libraries (JAX, TF).
            executor = concurrent.futures.ProcessPoolExecutor(
                num_workers, mp_context=multiprocessing.get_context("spawn")
            )
        for split, count in (("train", num_train), ("test", num_test), ("selection", num_selection)):
            _write_split(staging / split, split, count, parameters, executor, num_workers)
        (staging / VOCAB_FILE).write_text("\n".join(lexicon().words) + "\n", encoding="utf-8")
        synonym_map = {word: list(words) for word, words in lexicon().synonyms.items()}
        (staging / SYNONYMS_FILE).write_text(json.dumps(synonym_map, indent=1) + "\n", encoding="utf-8")
        (staging / WORLD_FILE).write_text(json.dumps(parameters, indent=2) + "\n")
        _move_into_place(staging, out_dir, parameters)
    finally:
        if executor is not None:
            executor.shutdown()
        if staging.exists():
            shutil.rmtree(staging)
    return out_dir


def _move_into_place(staging: pathlib.Path, out_dir: pathlib.Path, parameters: dict) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        if is_complete_world(out_dir, parameters):  # another process finished the same world first
            return
        retired = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
        out_dir.rename(retired)
        staging.rename(out_dir)
        if retired.is_dir():
            shutil.rmtree(retired)
        else:
            retired.unlink()
        return
    try:
        staging.rename(out_dir)  # also replaces an empty directory
    except OSError:
        if not is_complete_world(out_dir, parameters):  # lost a race to a process writing the same world
            raise


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write the synthetic world to a directory.")
    parser.add_argument("--out", required=True, help="directory to write the world to")
    parser.add_argument("--image_size", type=int, default=64)
    parser.add_argument("--num_train", type=int, default=20000)
    parser.add_argument("--num_test", type=int, default=2400)
    parser.add_argument("--num_selection", type=int, default=1200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jpeg_quality", type=int, default=90)
    parser.add_argument("--num_classes", type=int, default=NUM_CLASSES)
    parser.add_argument("--num_workers", type=int, default=1, help="rendering processes")
    parser.add_argument("--overwrite", action="store_true", help="replace whatever is at --out")
    args = vars(parser.parse_args(argv))
    out_dir = write_world(args.pop("out"), **args)
    print(f"world ready at {out_dir}")


if __name__ == "__main__":
    main()
