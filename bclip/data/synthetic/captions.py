"""Captions: the sentence describing a scene (`scene_and_caption`), and the lexicon of every word a
caption or prompt can contain, with the synonyms used for caption augmentation."""

from __future__ import annotations

import dataclasses
import functools
import re

import numpy as np

from bclip.data.synthetic.scenes import (
    BACKGROUND_COLOURS,
    BACKGROUND_KINDS,
    DISTRACTOR_COLOURS,
    DISTRACTOR_SHAPES,
    Background,
    Scene,
    _pick,
    _rng,
    _sample_scene,
)
from bclip.data.synthetic.shapes import CLASSES, NUM_CLASSES, PROMPT_TEMPLATES, _check_num_classes

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


def scene_and_caption(seed: int, split: str, index: int, num_classes: int = NUM_CLASSES) -> tuple[Scene, str]:
    """The scene and caption of example `index` of `split` (a pure function of its arguments)."""
    _check_num_classes(num_classes)
    rng = _rng(seed, split, index)
    scene = _sample_scene(rng, split, index, num_classes)
    return scene, _caption(scene, rng)


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
