"""Caption tokenizers producing fixed-length int32 token rows: OpenAI CLIP's byte-level BPE and a
word-level tokenizer over a known vocabulary (the synthetic world's), both built on `tokenizers`.

Every tokenizer shares one layout: pad id 0, start-of-text id vocab_size - 2 at position 0, and an
end-of-text id vocab_size - 1 that is always present, because the text tower pools there.
"""

from __future__ import annotations

import gzip
import html
import pathlib
import re
import unicodedata
from collections.abc import Callable, Sequence

import ftfy
import ml_collections
import numpy as np
from tokenizers import Regex, Tokenizer, models, pre_tokenizers

PAD_ID = 0
DEFAULT_CONTEXT_LENGTH = 77

CLIP_VOCAB_SIZE = 49408
# 256 byte symbols, 256 end-of-word byte symbols and the two special tokens leave room for this many
# merges, which is how many of the (much longer) merges file CLIP reads.
CLIP_NUM_MERGES = CLIP_VOCAB_SIZE - 2 * 256 - 2
CLIP_START_OF_TEXT = "<|startoftext|>"
CLIP_END_OF_TEXT = "<|endoftext|>"
END_OF_WORD = "</w>"

# CLIP's pre-tokenisation: English contractions, runs of letters, single digits, runs of other
# non-space symbols. Whitespace is dropped.
_CLIP_PIECE_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}|[^\s\p{L}\p{N}]+"""
# The word tokenizer's pieces (tokenizers' `Whitespace` pre-tokenizer uses the same rule).
WORD_PIECE_PATTERN = re.compile(r"\w+|[^\w\s]+")
_WHITESPACE_RUN = re.compile(r"\s+")
_SPACE_BEFORE_PUNCTUATION = re.compile(r" ([^\w\s]+)(?= |$)")


def clean_caption(caption: str) -> str:
    """Cleans a caption the way CLIP does before tokenising.

    HTML entities are unescaped (twice: web captions are often double-escaped), text is
    NFC-normalised, whitespace runs collapse to one space, and everything is lowercased.
    `ClipBpeTokenizer` first repairs the text with `ftfy.fix_text`, as CLIP does (mojibake,
    ligatures, curly quotes, full-width forms).
    """
    caption = html.unescape(html.unescape(caption))
    caption = unicodedata.normalize("NFC", caption)
    return _WHITESPACE_RUN.sub(" ", caption).strip().lower()


def byte_to_unicode() -> dict[int, str]:
    """CLIP's (and GPT-2's) reversible map from the 256 byte values to printable characters.

    Printable Latin-1 bytes map to themselves; the other 68 bytes map to code points from 256 on.
    The dict's order (printable bytes first, then the rest) is the order of CLIP's first 256 ids.
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    mapping = {byte: chr(byte) for byte in printable}
    next_code_point = 256
    for byte in range(256):
        if byte not in mapping:
            mapping[byte] = chr(next_code_point)
            next_code_point += 1
    return mapping


class _FixedLengthTokenizer:
    """Shared encoding into [N, L] rows; subclasses set `_tokenizer` and `vocab_size`."""

    _tokenizer: Tokenizer
    vocab_size: int

    @property
    def sot_id(self) -> int:
        return self.vocab_size - 2

    @property
    def eot_id(self) -> int:
        return self.vocab_size - 1

    def token_ids(self, caption: str) -> list[int]:
        """Ids of a cleaned caption's tokens, without start/end-of-text, not truncated."""
        return self._tokenizer.encode(clean_caption(caption), add_special_tokens=False).ids

    def encode_batch(
        self, captions: Sequence[str], context_length: int = DEFAULT_CONTEXT_LENGTH
    ) -> np.ndarray:
        """Tokenises captions into int32 [N, context_length] rows.

        Row layout: start-of-text, at most context_length - 2 caption tokens, end-of-text, then
        pad (0). A long caption is cut before the end-of-text token, which is always kept.
        """
        if context_length < 2:
            raise ValueError(f"context_length must be >= 2 to hold start/end-of-text, got {context_length}")
        rows = np.full((len(captions), context_length), PAD_ID, np.int32)
        rows[:, 0] = self.sot_id
        # One caption at a time rather than `Tokenizer.encode_batch`: the batch call starts a Rust
        # thread pool, which misbehaves in data-loader worker processes forked afterwards.
        for row, caption in zip(rows, captions):
            body = self.token_ids(caption)[: context_length - 2]
            row[1 : 1 + len(body)] = body
            row[1 + len(body)] = self.eot_id
        return rows

    def encode(self, caption: str, context_length: int = DEFAULT_CONTEXT_LENGTH) -> np.ndarray:
        """Tokenises one caption into an int32 [context_length] row (see `encode_batch`)."""
        return self.encode_batch([caption], context_length)[0]

    def tokens(self, ids: Sequence[int] | np.ndarray) -> list[str]:
        """Token strings of one row [L] between start-of-text and the first end-of-text."""
        ids = [int(i) for i in ids]
        if ids and ids[0] == self.sot_id:
            ids = ids[1:]
        if self.eot_id in ids:
            ids = ids[: ids.index(self.eot_id)]
        return [self._id_to_token(i) for i in ids]

    def _id_to_token(self, token_id: int) -> str:
        token = self._tokenizer.id_to_token(token_id)
        if token is None:
            raise ValueError(f"token id {token_id} is not in the vocabulary")
        return token


class ClipBpeTokenizer(_FixedLengthTokenizer):
    """OpenAI CLIP's byte-level BPE tokenizer, built from its merges file.

    Vocabulary layout (as in CLIP): the 256 byte symbols, the same 256 with '</w>' appended, one
    token per merge, then <|startoftext|> and <|endoftext|> (49406 and 49407 for the real file).
    As in OpenAI CLIP, the pad id 0 is also the token '!'; rows are only read up to end-of-text.
    """

    def __init__(self, merges: Sequence[tuple[str, str]]):
        byte_symbols = list(byte_to_unicode().values())
        vocab_tokens = [
            *byte_symbols,
            *(symbol + END_OF_WORD for symbol in byte_symbols),
            *(left + right for left, right in merges),
            CLIP_START_OF_TEXT,
            CLIP_END_OF_TEXT,
        ]
        vocab = {token: token_id for token_id, token in enumerate(vocab_tokens)}
        if len(vocab) != len(vocab_tokens):
            raise ValueError("merges produce duplicate tokens; not a CLIP merges file")
        self.vocab_size = len(vocab_tokens)
        self._byte_decoder = {symbol: byte for byte, symbol in byte_to_unicode().items()}
        self._tokenizer = Tokenizer(
            models.BPE(vocab=vocab, merges=list(merges), end_of_word_suffix=END_OF_WORD)
        )
        self._tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                # invert=True keeps the pattern's matches as pieces and drops what lies between.
                pre_tokenizers.Split(Regex(_CLIP_PIECE_PATTERN), behavior="removed", invert=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )

    def token_ids(self, caption: str) -> list[int]:
        """Ids of a caption's tokens after CLIP's ftfy repair and cleaning, without start/end-of-text."""
        return super().token_ids(ftfy.fix_text(caption))

    @classmethod
    def from_file(cls, path: str | pathlib.Path, max_merges: int = CLIP_NUM_MERGES) -> ClipBpeTokenizer:
        """Reads a CLIP merges file (e.g. bpe_simple_vocab_16e6.txt.gz, gzipped or plain).

        The first line is a header; each further line is one merge "left right". Like CLIP, only
        the first `max_merges` merges are used, which gives the 49,408-token vocabulary.
        """
        path = pathlib.Path(path)
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", encoding="utf-8") as merges_file:
            lines = merges_file.read().split("\n")[1:]
        merges = []
        for line_number, line in enumerate(lines, start=2):
            if len(merges) == max_merges:
                break
            if not line.strip():
                continue
            parts = line.split()
            if len(parts) != 2:
                raise ValueError(f"{path}:{line_number}: expected 'left right', got {line!r}")
            merges.append((parts[0], parts[1]))
        return cls(merges)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Text of one token row [L] (between start- and end-of-text); pads after it are ignored."""
        # '</w>' ends a pre-tokenisation piece; pieces were separated by whitespace or adjoined
        # punctuation, which CLIP cannot tell apart, so every piece boundary becomes one space.
        pieces = "".join(self.tokens(ids)).split(END_OF_WORD)
        words = [
            bytes(self._byte_decoder[symbol] for symbol in piece).decode("utf-8", errors="replace")
            for piece in pieces
        ]
        return " ".join(word for word in words if word)


class WordTokenizer(_FixedLengthTokenizer):
    """Word-level tokenizer over a fixed vocabulary; unknown words map to [UNK].

    Ids: 0 [PAD], 1 [UNK], the words from 2 on in the given order, unused ids up to vocab_size - 3,
    then start-of-text (vocab_size - 2) and end-of-text (vocab_size - 1). Captions split into runs
    of word characters and runs of punctuation, so "apple," is the two tokens "apple" and ",".
    """

    PAD = "[PAD]"
    UNK = "[UNK]"
    START_OF_TEXT = "[SOT]"
    END_OF_TEXT = "[EOT]"
    UNK_ID = 1

    def __init__(self, words: Sequence[str], vocab_size: int | None = None):
        seen = {self.PAD, self.UNK, self.START_OF_TEXT, self.END_OF_TEXT}
        unique_words = []
        for word in words:
            word = clean_caption(word)
            if not word or word in seen:
                continue
            if WORD_PIECE_PATTERN.fullmatch(word) is None:
                raise ValueError(f"{word!r} splits into several tokens, so it can never be produced")
            seen.add(word)
            unique_words.append(word)
        needed = len(unique_words) + 4
        vocab_size = needed if vocab_size is None else int(vocab_size)
        if vocab_size < needed:
            raise ValueError(f"vocab_size {vocab_size} cannot hold {len(unique_words)} words + 4 specials")
        self.vocab_size = vocab_size
        self.words = tuple(unique_words)
        vocab = {self.PAD: PAD_ID, self.UNK: self.UNK_ID}
        vocab.update({word: token_id for token_id, word in enumerate(unique_words, start=2)})
        vocab[self.START_OF_TEXT] = self.sot_id
        vocab[self.END_OF_TEXT] = self.eot_id
        self._tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token=self.UNK))
        self._tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()

    @classmethod
    def from_file(cls, path: str | pathlib.Path, vocab_size: int | None = None) -> WordTokenizer:
        """Reads a vocabulary file with one word per line."""
        words = pathlib.Path(path).read_text(encoding="utf-8").splitlines()
        return cls(words, vocab_size=vocab_size)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Text of one token row [L]: words joined by spaces, punctuation attached to its word."""
        return _SPACE_BEFORE_PUNCTUATION.sub(r"\1", " ".join(self.tokens(ids)))


CaptionTokenizer = ClipBpeTokenizer | WordTokenizer


def _build_clip_bpe(config: ml_collections.ConfigDict) -> ClipBpeTokenizer:
    return ClipBpeTokenizer.from_file(config.path)


def _build_word(config: ml_collections.ConfigDict) -> WordTokenizer:
    return WordTokenizer.from_file(config.path, vocab_size=config.get("vocab_size"))


TOKENIZER_BUILDERS: dict[str, Callable[[ml_collections.ConfigDict], CaptionTokenizer]] = {
    "clip_bpe": _build_clip_bpe,
    "word": _build_word,
}


def build_tokenizer(config: ml_collections.ConfigDict) -> CaptionTokenizer:
    """Builds the tokenizer a config names.

    config.kind: 'clip_bpe' (config.path: the merges file) or 'word' (config.path: the vocabulary
    file, one word per line; optional config.vocab_size pads the vocabulary to the model's size).
    """
    if config.kind not in TOKENIZER_BUILDERS:
        raise ValueError(f"unknown tokenizer kind {config.kind!r}; known: {sorted(TOKENIZER_BUILDERS)}")
    return TOKENIZER_BUILDERS[config.kind](config)
