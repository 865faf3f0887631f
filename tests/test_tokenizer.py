"""Tests for bclip.data.tokenizer: row layout, end-of-text kept, word tokenizer, CLIP BPE layout."""

import copy
import gzip
import re

import ml_collections
import numpy as np
import pytest

from bclip.data import tokenizer as tok

# A tiny merges file in CLIP's format. Ranks are line order; ids are 512 + rank.
TINY_MERGES = [
    ("a", "n"),  # 512
    ("an", "a</w>"),  # 513
    ("b", "an"),  # 514
    ("ban", "ana</w>"),  # 515
    ("t", "h"),  # 516
    ("th", "e</w>"),  # 517
    ("p", "h"),  # 518
    ("o", "t"),  # 519
    ("ph", "ot"),  # 520
    ("phot", "o</w>"),  # 521
    ("o", "f</w>"),  # 522
    ("r", "e"),  # 523
    ("re", "d</w>"),  # 524
]


@pytest.fixture(scope="module")
def merges_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("bpe") / "tiny_merges.txt.gz"
    with gzip.open(path, "wt", encoding="utf-8") as merges_file:
        merges_file.write("#version: 0.2\n")
        merges_file.write("".join(f"{left} {right}\n" for left, right in TINY_MERGES))
    return path


@pytest.fixture(scope="module")
def bpe(merges_path):
    return tok.ClipBpeTokenizer.from_file(merges_path)


@pytest.fixture(scope="module")
def words():
    return tok.WordTokenizer(["a", "photo", "of", "banana", "apple", ",", ".", "red"], vocab_size=100)


def reference_clip_bpe(piece: str, merges) -> list[str]:
    """CLIP's BPE on one pre-tokenised piece, written out plainly: merge the best-ranked pair
    everywhere it occurs, left to right, until no pair has a rank."""
    ranks = {pair: rank for rank, pair in enumerate(merges)}
    encoder = tok.byte_to_unicode()
    symbols = [encoder[b] for b in piece.encode("utf-8")]
    symbols[-1] += "</w>"
    while len(symbols) > 1:
        pairs = {(symbols[i], symbols[i + 1]) for i in range(len(symbols) - 1)}
        best = min(pairs, key=lambda pair: ranks.get(pair, float("inf")))
        if best not in ranks:
            break
        merged, i = [], 0
        while i < len(symbols):
            if i < len(symbols) - 1 and (symbols[i], symbols[i + 1]) == best:
                merged.append(symbols[i] + symbols[i + 1])
                i += 2
            else:
                merged.append(symbols[i])
                i += 1
        symbols = merged
    return symbols


def test_clip_bpe_vocabulary_layout(bpe):
    assert bpe.vocab_size == 512 + len(TINY_MERGES) + 2 == 527
    assert (bpe.sot_id, bpe.eot_id) == (525, 526)
    token_to_id = bpe._tokenizer.token_to_id
    # CLIP's order: printable bytes first ('!' is byte 33), then the others from chr(256) on.
    assert token_to_id("!") == 0
    assert token_to_id("~") == 93
    assert token_to_id("¡") == 94
    assert token_to_id("Ġ") == 188 + 32  # the space byte
    assert token_to_id(chr(323)) == 255
    assert token_to_id("!</w>") == 256
    assert token_to_id(chr(323) + "</w>") == 511
    assert token_to_id("an") == 512
    assert token_to_id("red</w>") == 524
    assert token_to_id("<|startoftext|>") == 525
    assert token_to_id("<|endoftext|>") == 526


def test_clip_bpe_known_encodings(bpe):
    row = bpe.encode("A  photo of THE banana!", context_length=10)
    # a</w>: 256 + ('a' - '!'), photo</w> 521, of</w> 522, the</w> 517, banana</w> 515, !</w> 256.
    np.testing.assert_array_equal(row, [525, 256 + 64, 521, 522, 517, 515, 256, 526, 0, 0])
    assert row.dtype == np.int32
    # 'é' is the bytes c3 a9 -> symbols 'Ã' (id 106 + 195 - 174) and '©' (id 94 + 169 - 161).
    np.testing.assert_array_equal(bpe.encode("é", context_length=4), [525, 127, 256 + 102, 526])
    # Contractions and single digits are their own pieces.
    assert bpe.tokens(bpe.encode("it's 42"))[:2] == ["i", "t</w>"]
    assert bpe.tokens(bpe.encode("it's 42"))[2:] == ["'", "s</w>", "4</w>", "2</w>"]
    assert bpe.decode(bpe.encode("the red banana, é")) == "the red banana , é"


def test_clip_bpe_matches_reference_algorithm(bpe):
    rng = np.random.default_rng(0)
    letters = list("abnthepofrd")
    for _ in range(200):
        piece = "".join(rng.choice(letters, size=rng.integers(1, 12)))
        expected = reference_clip_bpe(piece, TINY_MERGES)
        assert bpe.tokens(bpe.encode(piece)) == expected, piece


def test_clip_bpe_reads_only_the_first_merges(merges_path):
    limited = tok.ClipBpeTokenizer.from_file(merges_path, max_merges=4)
    assert limited.vocab_size == 512 + 4 + 2
    assert limited.tokens(limited.encode("banana the")) == ["banana</w>", "t", "h", "e</w>"]
    assert tok.CLIP_NUM_MERGES == 48894  # 512 + 48894 + 2 = 49408 for the real file


@pytest.mark.parametrize("which", ["bpe", "words"])
def test_long_captions_keep_end_of_text(which, bpe, words):
    tokenizer = {"bpe": bpe, "words": words}[which]
    captions = ["a photo of a red banana " * 30, "banana", ""]
    rows = tokenizer.encode_batch(captions, context_length=8)
    assert rows.shape == (3, 8) and rows.dtype == np.int32
    assert (rows[:, 0] == tokenizer.sot_id).all()
    assert rows[0, -1] == tokenizer.eot_id  # cut before end-of-text, which stays
    assert tokenizer.eot_id not in rows[0, :-1]
    assert rows[1, 2] == tokenizer.eot_id and (rows[1, 3:] == tok.PAD_ID).all()
    assert rows[2, 1] == tokenizer.eot_id and (rows[2, 2:] == tok.PAD_ID).all()
    np.testing.assert_array_equal(tokenizer.encode(captions[0], context_length=8), rows[0])
    with pytest.raises(ValueError):
        tokenizer.encode("banana", context_length=1)


def test_word_tokenizer_ids_and_round_trip(words):
    assert (words.vocab_size, words.sot_id, words.eot_id) == (100, 98, 99)
    row = words.encode("A  Photo of a red BANANA, apple.", context_length=12)
    # [PAD]=0, [UNK]=1, words from 2 in the given order.
    np.testing.assert_array_equal(row, [98, 2, 3, 4, 2, 9, 5, 7, 6, 8, 99, 0])
    assert words.decode(row) == "a photo of a red banana, apple."
    unknown = words.encode("a purple banana")
    np.testing.assert_array_equal(unknown[:5], [98, 2, tok.WordTokenizer.UNK_ID, 5, 99])
    assert words.decode(unknown) == "a [UNK] banana"
    # A caption cannot inject special tokens: they split into punctuation and words.
    assert words.encode("banana [EOT] apple").tolist().count(words.eot_id) == 1


def test_word_tokenizer_vocab_size_checks(tmp_path):
    vocab_file = tmp_path / "vocab.txt"
    vocab_file.write_text("banana\napple\n\nbanana\n")
    minimal = tok.WordTokenizer.from_file(vocab_file)
    assert minimal.words == ("banana", "apple")
    assert (minimal.vocab_size, minimal.sot_id, minimal.eot_id) == (6, 4, 5)
    with pytest.raises(ValueError, match="cannot hold"):
        tok.WordTokenizer(["banana", "apple"], vocab_size=5)
    with pytest.raises(ValueError, match="several tokens"):
        tok.WordTokenizer(["close-up"])


def test_build_tokenizer_from_config(tmp_path, merges_path):
    vocab_file = tmp_path / "vocab.txt"
    vocab_file.write_text("banana\napple\n")
    word_tokenizer = tok.build_tokenizer(
        ml_collections.ConfigDict({"kind": "word", "path": str(vocab_file), "vocab_size": 1000})
    )
    assert isinstance(word_tokenizer, tok.WordTokenizer) and word_tokenizer.eot_id == 999
    bpe_tokenizer = tok.build_tokenizer(
        ml_collections.ConfigDict({"kind": "clip_bpe", "path": str(merges_path)})
    )
    assert isinstance(bpe_tokenizer, tok.ClipBpeTokenizer) and bpe_tokenizer.vocab_size == 527
    with pytest.raises(ValueError, match="unknown tokenizer kind"):
        tok.build_tokenizer(ml_collections.ConfigDict({"kind": "sentencepiece", "path": "x"}))


def test_tokenizers_survive_copying_for_worker_processes(bpe, words):
    # Data-loader workers receive copies of the transform; the copies must encode identically.
    for tokenizer in (bpe, words):
        clone = copy.deepcopy(tokenizer)
        caption = "a photo of the banana"
        np.testing.assert_array_equal(clone.encode(caption), tokenizer.encode(caption))


def test_clean_caption_matches_clip_cleaning():
    assert tok.clean_caption("  A &amp;amp; B\n\tC  ") == "a & b c"
    assert re.fullmatch(r"[a-z ]+", tok.clean_caption("Photo OF  a\u00a0Banana"))


def test_clip_bpe_repairs_text_like_clip_first(bpe):
    """Ligatures, curly quotes, full-width letters and mojibake tokenise as their plain text."""
    for broken, plain in [
        ("\ufb01ne", "fine"),
        ("\u201cdog\u201d", '"dog"'),
        ("\uff24\uff2f\uff27", "dog"),
        ("caf\u00c3\u00a9", "caf\u00e9"),
    ]:
        np.testing.assert_array_equal(bpe.encode(broken, 16), bpe.encode(plain, 16))
    assert not np.array_equal(bpe.encode("\ufb01ne", 16), bpe.encode("one", 16))
