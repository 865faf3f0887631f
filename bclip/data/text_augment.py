"""Random caption views for the in-modal SSL term: EDA (Wei & Zou, 2019), pluggable synonyms.

Runs in Grain worker processes, so it uses only the standard library and numpy. `eda` is a pure
function of (caption, synonym source, seed); a failure is raised with the caption and seed,
never swallowed.
"""

from __future__ import annotations

import re
import threading
import weakref
from typing import Callable, Mapping, Sequence

import numpy as np

SynonymSource = Callable[[str], Sequence[str]]

# Function words that synonym replacement and insertion leave alone: swapping "the" for a
# WordNet "synonym" only adds noise, and content words carry the caption's meaning.
STOP_WORDS: frozenset[str] = frozenset("""
a about above after again against all am an and any are as at be because been before being
below between both but by can could did do does doing down during each few for from further
had has have having he her here hers herself him himself his how i if in into is it its itself
just me more most my myself no nor not now of off on once only or other our ours ourselves out
over own same she should so some such than that the their theirs them themselves then there
these they this those through to too under until up very was we were what when where which
while who whom why will with would you your yours yourself yourselves
""".split())

# Letters and digits in any script; underscores and punctuation separate words.
_WORD_PATTERN = re.compile(r"[^\W_]+")


class TextAugmentationError(RuntimeError):
    """An EDA step failed; the message names the caption, the seed and the operation."""


def caption_words(caption: str) -> list[str]:
    """Lower-case words of a caption, as EDA sees them.

    Apostrophes are dropped inside words ("dog's" -> "dogs") and any other character that is
    not a letter or digit separates words, as in the reference EDA (which also dropped digits
    and accented letters; we keep them).
    """
    return _WORD_PATTERN.findall(caption.lower().replace("'", "").replace("\u2019", ""))


def _synonyms_of(word: str, synonyms: SynonymSource) -> list[list[str]]:
    """Distinct synonyms of `word` other than itself, each as a list of words (multi-word
    synonyms such as "hot dog" are allowed), in the order the source gives them."""
    found = synonyms(word)
    if isinstance(found, str) or not isinstance(found, Sequence):
        # Sets are refused too: their order varies between processes, which would break seeding.
        raise TypeError(f"synonym source must return a list of strings, got {found!r} for {word!r}")
    distinct: list[list[str]] = []
    for synonym in found:
        if not isinstance(synonym, str):
            raise TypeError(f"synonym source returned a non-string {synonym!r} for {word!r}")
        words = caption_words(synonym)
        if words and words != [word] and words not in distinct:
            distinct.append(words)
    return distinct


# Each source's normalised synonyms, kept across calls (a source must answer the same for a word
# every time anyway, or no view could be reproduced from its seed).
_NORMALISED_SYNONYMS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _cached(synonyms: SynonymSource) -> Callable[[str], list[list[str]]]:
    try:
        cache = _NORMALISED_SYNONYMS.setdefault(synonyms, {})
    except TypeError:  # not weak-referenceable: a cache for this call only
        cache = {}

    def lookup(word: str) -> list[list[str]]:
        if word not in cache:
            cache[word] = _synonyms_of(word, synonyms)
        return cache[word]

    return lookup


def synonym_replacement(words: Sequence[str], synonyms: SynonymSource, num_replacements: int,
                        rng: np.random.Generator) -> list[str]:
    """Replace up to `num_replacements` distinct non-stop-words that have synonyms, each (all of
    its occurrences) by one of its synonyms drawn at random."""
    lookup = _cached(synonyms)
    candidates = list(dict.fromkeys(word for word in words if word not in STOP_WORDS))
    replacement_for: dict[str, list[str]] = {}
    for index in rng.permutation(len(candidates)):
        if len(replacement_for) >= num_replacements:
            break
        word = candidates[index]
        options = lookup(word)
        if options:
            replacement_for[word] = options[int(rng.integers(len(options)))]
    new_words: list[str] = []
    for word in words:
        new_words.extend(replacement_for.get(word, [word]))
    return new_words


def random_insertion(words: Sequence[str], synonyms: SynonymSource, num_insertions: int,
                     rng: np.random.Generator) -> list[str]:
    """Insert, `num_insertions` times, a random synonym of a random non-stop-word of the caption
    at a random position. Words without synonyms are never picked; a caption with none is
    returned unchanged."""
    lookup = _cached(synonyms)
    new_words = list(words)
    for _ in range(num_insertions):
        # Recomputed each time: an inserted synonym may itself be the source of the next one,
        # as in the reference.
        sources = [word for word in new_words if word not in STOP_WORDS and lookup(word)]
        if not sources:
            break
        options = lookup(sources[int(rng.integers(len(sources)))])
        synonym = options[int(rng.integers(len(options)))]
        position = int(rng.integers(len(new_words) + 1))
        new_words[position:position] = synonym
    return new_words


def random_swap(words: Sequence[str], num_swaps: int, rng: np.random.Generator) -> list[str]:
    """Swap two words at distinct random positions, `num_swaps` times."""
    new_words = list(words)
    if len(new_words) < 2:
        return new_words
    for _ in range(num_swaps):
        first, second = rng.choice(len(new_words), size=2, replace=False)
        new_words[first], new_words[second] = new_words[second], new_words[first]
    return new_words


def random_deletion(words: Sequence[str], deletion_probability: float,
                    rng: np.random.Generator) -> list[str]:
    """Delete each word independently with `deletion_probability`; if every word would go,
    keep one at random, so the result is never empty."""
    if len(words) <= 1:
        return list(words)
    keep = rng.random(len(words)) >= deletion_probability
    if not keep.any():
        return [words[int(rng.integers(len(words)))]]
    return [word for word, kept in zip(words, keep) if kept]


def eda(caption: str, synonyms: SynonymSource, seed: int | Sequence[int], alpha_sr: float = 0.1,
        alpha_ri: float = 0.1, alpha_rs: float = 0.1, p_rd: float = 0.1) -> str:
    """One EDA view of `caption`: one of synonym replacement, random insertion, random swap and
    random deletion, drawn uniformly among those with a non-zero rate, applied to the caption's
    words (see `caption_words`).

    SR, RI and RS make n = max(1, int(alpha * num_words)) changes; RD drops each word with
    probability p_rd. The result is lower-case words joined by spaces, never empty. With every
    rate zero the normalised caption comes back unchanged. Deterministic in `seed` (anything
    np.random.default_rng accepts). Raises TextAugmentationError naming the caption and seed if a
    step fails, and ValueError for a caption without words.
    """
    for name, rate in (("alpha_sr", alpha_sr), ("alpha_ri", alpha_ri), ("alpha_rs", alpha_rs),
                       ("p_rd", p_rd)):
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {rate}")
    words = caption_words(caption)
    if not words:
        raise ValueError(f"caption {caption!r} has no words to augment (seed {seed!r})")
    num_words = len(words)
    operations = [
        ("synonym_replacement", alpha_sr,
         lambda rng: synonym_replacement(words, synonyms, max(1, int(alpha_sr * num_words)), rng)),
        ("random_insertion", alpha_ri,
         lambda rng: random_insertion(words, synonyms, max(1, int(alpha_ri * num_words)), rng)),
        ("random_swap", alpha_rs,
         lambda rng: random_swap(words, max(1, int(alpha_rs * num_words)), rng)),
        ("random_deletion", p_rd, lambda rng: random_deletion(words, p_rd, rng)),
    ]
    enabled = [(name, apply) for name, rate, apply in operations if rate > 0]
    if not enabled:
        return " ".join(words)
    rng = np.random.default_rng(seed)
    name, apply = enabled[int(rng.integers(len(enabled)))]
    try:
        new_words = apply(rng)
    except Exception as error:
        raise TextAugmentationError(
            f"EDA {name} failed on caption {caption!r} with seed {seed!r}: "
            f"{type(error).__name__}: {error}") from error
    if not new_words:
        raise TextAugmentationError(
            f"EDA {name} produced an empty caption from {caption!r} with seed {seed!r}")
    return " ".join(new_words)


# ----------------------------------------------------------------------------------------------
# Synonym sources. Classes rather than closures so that they pickle into Grain worker processes.
# ----------------------------------------------------------------------------------------------


class LexiconSynonyms:
    """Synonyms from a fixed word -> synonyms mapping (keys matched lower-case); unknown words
    have none. The mapping is taken as given: it is not made symmetric."""

    def __init__(self, mapping: Mapping[str, Sequence[str]]):
        self._mapping: dict[str, tuple[str, ...]] = {}
        for word, synonyms in mapping.items():
            if not isinstance(word, str) or isinstance(synonyms, str) or not all(
                    isinstance(synonym, str) for synonym in synonyms):
                raise TypeError(f"lexicon must map str -> list[str], got {word!r}: {synonyms!r}")
            self._mapping[word.lower()] = tuple(synonyms)

    def __call__(self, word: str) -> list[str]:
        return list(self._mapping.get(word.lower(), ()))


def lexicon_synonyms(mapping: Mapping[str, Sequence[str]]) -> LexiconSynonyms:
    """A synonym source backed by `mapping` (e.g. the synthetic world's lexicon)."""
    return LexiconSynonyms(mapping)


_NLTK_MISSING = (
    "WordNet synonyms need the nltk package, which is not installed. Install it with "
    "`pip install nltk`, then fetch the corpus once with `python -m nltk.downloader wordnet` "
    "(bclip never downloads data itself), or use lexicon_synonyms(...) instead.")
_WORDNET_MISSING = (
    "nltk is installed but its WordNet corpus was not found. Fetch it once with "
    "`python -m nltk.downloader wordnet` (some nltk versions also want `omw-1.4`), or point the "
    "NLTK_DATA environment variable at a folder holding corpora/wordnet. bclip never downloads "
    "data itself.")


def _import_wordnet():
    try:
        from nltk.corpus import wordnet
    except ImportError as error:
        raise ImportError(_NLTK_MISSING) from error
    return wordnet


def _check_wordnet_corpus() -> None:
    wordnet = _import_wordnet()
    try:
        # The corpus loads lazily; a first lookup surfaces a missing corpus now, not mid-training.
        wordnet.synsets("dog")
    except LookupError as error:
        raise LookupError(f"{_WORDNET_MISSING}\nnltk said: {error}") from error


class WordNetSynonyms:
    """Synonyms from NLTK's English WordNet: the lemma names of every synset of the word, with
    underscores and hyphens read as spaces, letters only, sorted so that the order (and hence
    every seeded draw) does not depend on Python's hash seed."""

    def __init__(self):
        _check_wordnet_corpus()
        self._cache: dict[str, list[str]] = {}
        # NLTK's reader seeks and reads shared file handles: one lookup at a time when batches
        # are built in several threads (data.num_threads).
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:
        return {"cache": self._cache}

    def __setstate__(self, state: dict) -> None:
        # In a worker process: load the corpus now, before its threads look words up.
        self.__init__()
        self._cache = state["cache"]

    def __call__(self, word: str) -> list[str]:
        with self._lock:
            if word not in self._cache:
                wordnet = _import_wordnet()
                names = set()
                for synset in wordnet.synsets(word):
                    for lemma in synset.lemma_names():
                        name = re.sub(r"[^a-z ]", "", lemma.replace("_", " ").replace("-", " ").lower())
                        name = " ".join(name.split())
                        if name and name != word:
                            names.add(name)
                self._cache[word] = sorted(names)
            return list(self._cache[word])


def wordnet_synonyms() -> WordNetSynonyms:
    """A synonym source backed by NLTK's WordNet (the study's choice).

    Raises ImportError if nltk is not installed and LookupError if its WordNet corpus is missing,
    each saying how to install it; nothing is downloaded.
    """
    return WordNetSynonyms()
