"""Zero-shot accuracy and ASR on stub embeddings whose right answers are known in advance."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bclip import evaluation

# Jitted, as the evaluators run them: op by op, each of their ops would compile on its own.
_eval_counts = jax.jit(evaluation.eval_counts, static_argnums=5)
_normalise = jax.jit(evaluation.normalise)


def _one_hot(ids, dim):
    return jnp.asarray(np.eye(dim, dtype=np.float32)[ids])


def _scores_ranking(order, num_classes):
    """An image embedding [C] whose similarity to class embedding e_c ranks the classes in `order`."""
    scores = np.zeros(num_classes, np.float32)
    scores[list(order)] = np.linspace(1.0, 0.1, len(order))
    return scores


def test_counts_on_known_embeddings():
    # 8 classes, class k's embedding is e_k; the target is class 7. Each clean image ranks the classes
    # in the order given, so its label's rank is known: 1st, 3rd, 6th (just outside the top 5), 5th (just
    # inside), 1st, 1st (but padding), 8th.
    num_classes, target = 8, 7
    class_emb = _one_hot(list(range(num_classes)), num_classes)
    labels = np.array([0, 1, 2, 7, 4, 5, 6])
    rankings = [
        [0, 1, 2, 3, 4, 5, 6, 7],
        [3, 0, 1, 2, 4, 5, 6, 7],
        [0, 1, 3, 4, 5, 2, 6, 7],
        [0, 1, 2, 3, 7, 4, 5, 6],
        [4, 0, 1, 2, 3, 5, 6, 7],
        [5, 0, 1, 2, 3, 4, 6, 7],
        [0, 1, 2, 3, 4, 5, 7, 6],
    ]
    image_emb = jnp.asarray(np.stack([_scores_ranking(order, num_classes) for order in rankings]))
    triggered = [7, 7, 2, 7, 7, 7, 3]  # rows 0, 1, 4 flip to the target; 2 and 6 do not; 3 is a target image
    valid = np.array([True, True, True, True, True, False, True])
    counts = _eval_counts(image_emb, _one_hot(triggered, num_classes), labels, valid, class_emb, target)
    per_class = {k: np.asarray(counts.pop(k)).tolist() for k in ("class_count", "class_top1")}
    counts = {k: int(v) for k, v in counts.items()}
    # 6 valid rows; right at top-1: rows 0, 4; in the top 5: rows 0, 1, 3, 4; attacked (valid, not of the
    # target class): rows 0, 1, 2, 4, 6, of which rows 0, 1, 4 go to the target.
    assert counts == {"count": 6, "top1": 2, "top5": 4, "asr_count": 5, "asr_hits": 3}
    # Valid rows by class (class 5's only row is padding, class 3 has none); right: classes 0 and 4.
    assert per_class == {"class_count": [1, 1, 1, 0, 1, 0, 1, 1], "class_top1": [1, 0, 0, 0, 1, 0, 0, 0]}
    summary = evaluation.summarise_counts([{**counts, **per_class}] * 2)
    assert summary == {
        "top1": 4 / 12, "top5": 8 / 12, "asr": 6 / 10, "num_images": 12, "num_attacked": 10,
        "mean_per_class_recall": 2 / 6,  # the 6 classes with images: recall 1 for two, 0 for four
    }


def test_asr_excludes_target_class_images():
    class_emb = _one_hot([0, 1, 2], 3)
    labels = np.array([2, 2, 2, 0])
    # Every triggered image is predicted as the target (2); only the one non-target image counts.
    counts = _eval_counts(
        _one_hot([2, 2, 2, 0], 3), _one_hot([2, 2, 2, 2], 3), labels, np.ones(4, bool), class_emb, 2
    )
    assert int(counts["asr_count"]) == 1 and int(counts["asr_hits"]) == 1


def test_top5_counts_rank_within_five():
    class_emb = np.eye(8, dtype=np.float32)
    # Image scores decrease with class id: classes 0..4 are the top 5.
    image = np.asarray([[8.0, 7, 6, 5, 4, 3, 2, 1]] * 2, np.float32) / 10
    counts = _eval_counts(image, image, np.array([4, 5]), np.ones(2, bool), class_emb, 7)
    assert int(counts["top1"]) == 0 and int(counts["top5"]) == 1


def test_class_embeddings_average_templates_per_class():
    # Stub text encoder: the embedding of a prompt is a one-hot on its class id, plus a
    # template-specific offset that averages out.
    classnames = ["apple", "banana", "cherry"]
    templates = ["a {}.", "the {}!"]
    words = {name: i for i, name in enumerate(classnames)}

    def tokenize(texts):
        rows = []
        for text in texts:
            name = text.split()[1].strip(".!")
            rows.append([words[name], 0 if text.startswith("a ") else 1])
        return np.asarray(rows, np.int32)

    @jax.jit
    def encode_text(tokens):
        base = jnp.eye(4)[tokens[:, 0]]
        offset = jnp.where(tokens[:, 1:2] == 0, 0.1, -0.1) * jnp.eye(4)[3]
        return evaluation.normalise(base + offset)

    emb = evaluation.class_embeddings(encode_text, evaluation.prompt_tokens(tokenize, classnames, templates), len(classnames))
    np.testing.assert_allclose(np.asarray(emb), np.eye(4)[:3], atol=1e-6)


def test_target_must_be_an_eval_class():
    assert evaluation.target_class_id(["Apple", "Banana"], "banana") == 1
    with pytest.raises(ValueError, match="not among the 2 eval classes"):
        evaluation.target_class_id(["apple", "cherry"], "banana")


def test_counts_sharded_over_eight_devices_match():
    from bclip import sharding

    mesh = sharding.make_mesh()
    rng = np.random.default_rng(0)
    # Host arrays, so placing them split over the devices slices them on the host (no program).
    emb = np.asarray(_normalise(rng.normal(size=(32, 6)).astype(np.float32)))
    trig = np.asarray(_normalise(rng.normal(size=(32, 6)).astype(np.float32)))
    labels = rng.integers(0, 5, 32).astype(np.int32)
    valid = rng.random(32) < 0.9
    class_emb = _normalise(rng.normal(size=(5, 6)).astype(np.float32))
    single = _eval_counts(emb, trig, labels, valid, class_emb, 2)
    split = sharding.batch_sharding(mesh)
    sharded = _eval_counts(*(jax.device_put(x, split) for x in (emb, trig, labels, valid)), class_emb, 2)
    assert {k: np.asarray(v).tolist() for k, v in single.items()} == {k: np.asarray(v).tolist() for k, v in sharded.items()}


def test_class_embeddings_pad_the_last_chunk_and_drop_the_padding():
    # 5 classes x 2 templates = 10 prompts in chunks of 4: the last chunk holds 2 prompts and 2 rows
    # of padding. The stub encoder counts the rows it sees and embeds prompt p of class c as a
    # one-hot on c, so any padding row that leaked into a class mean would tilt it.
    calls = []

    @jax.jit
    def embed(tokens):
        return jnp.eye(6)[tokens[:, 0]] + jnp.where(tokens[:, 1:2] == 1, 0.5, 0.0) * jnp.eye(6)[5]

    def encode_text(tokens):  # counted outside the jit: a jitted body runs once per shape
        calls.append(len(tokens))
        return embed(tokens)

    tokens = np.asarray([[c, t] for c in range(5) for t in range(2)], np.int32)
    emb = np.asarray(evaluation.class_embeddings(encode_text, tokens, 5, chunk_size=4))
    assert calls == [4, 4, 4]  # every call has the compiled size
    unit = lambda v: v / np.linalg.norm(v)  # noqa: E731
    expected = np.stack([unit(unit(np.eye(6)[c]) + unit(np.eye(6)[c] + 0.5 * np.eye(6)[5])) for c in range(5)])
    np.testing.assert_allclose(emb, expected, atol=1e-6)


def test_summary_of_a_set_without_attacked_images_and_of_an_empty_set():
    # Only target-class images: top-1 is defined, ASR is not (NaN, never 0 %).
    only_target = {"count": 3, "top1": 2, "top5": 3, "asr_count": 0, "asr_hits": 0}
    summary = evaluation.summarise_counts([only_target])
    assert (summary["top1"], summary["top5"], summary["num_attacked"]) == (2 / 3, 1.0, 0)
    assert np.isnan(summary["asr"])
    with pytest.raises(ValueError, match="no images"):
        evaluation.summarise_counts([{"count": 0, "top1": 0, "top5": 0, "asr_count": 0, "asr_hits": 0}])


class _StubCLIP:
    """Stands in for a CLIP model in the Evaluator: each image is a one-hot on (the sum of its red
    channel) mod 24, each prompt a one-hot on (its token sum) mod 24. Deterministic and
    content-dependent, so clean and triggered images land on different classes."""

    num_classes = 24

    def apply(self, variables, inputs, method=None, **kwargs):
        from bclip.models import clip

        if method is clip.CLIP.encode_image:
            return jax.nn.one_hot(jnp.sum(inputs[..., 0].astype(jnp.int32), axis=(1, 2)) % self.num_classes, self.num_classes)
        return jax.nn.one_hot(jnp.sum(inputs, axis=1) % self.num_classes, self.num_classes)


def test_evaluator_scores_clean_images_for_accuracy_and_triggered_ones_for_asr(tmp_path):
    """The Evaluator's wiring: top-1 comes from the clean images' embeddings and ASR from the
    triggered ones', each computed here image by image from the stub's outputs."""
    from bclip import config as run_configs
    from bclip import evaluators, sharding
    from bclip.data import training_input
    from bclip.data import pipeline
    from bclip.data.synthetic import writer

    world = writer.write_world(tmp_path / "world", image_size=32, num_train=8, num_test=96, num_selection=0)
    config = run_configs.run_config("micro-vit", image={"size": 32}, text={"context_length": 24, "vocab_size": 256})
    config.data.tokenizer.path = str(world / writer.VOCAB_FILE)
    config.poison.trigger.patch = "checkerboard"  # changes the red sum: another class for most images
    config.poison.trigger.size = 16
    config.eval.batch_size = 16
    with config.unlocked():
        config.eval.sets = {"test": run_configs.eval_set_config("folder", str(world / "test"))}
    model = _StubCLIP()
    (evaluator,) = evaluators.make_evaluators(config, model, training_input.make_tokenizer(config), sharding.make_mesh(), 0, 1).values()
    figures = evaluator({"params": {}})

    encode_text = jax.jit(lambda t: model.apply(None, t))
    class_emb = np.asarray(evaluation.class_embeddings(encode_text, evaluator.prompt_tokens, len(evaluator.classnames)))

    def predictions(images):
        red = np.asarray(images)[..., 0].astype(np.int64).sum(axis=(1, 2)) % 24
        return (np.eye(24)[red] @ class_emb.T).argmax(1)

    batches = list(pipeline.eval_batches(evaluator.source, image_size=32, batch_size=16, trigger=config.poison.trigger, seed=config.eval.seed))
    valid = np.concatenate([b["valid"] for b in batches])
    labels = np.concatenate([b["label"] for b in batches])[valid]
    clean = np.concatenate([predictions(b["image"]) for b in batches])[valid]
    triggered = np.concatenate([predictions(b["triggered"]) for b in batches])[valid]
    others = labels != evaluator.target
    assert figures["num_images"] == len(labels) == 96
    assert figures["top1"] == pytest.approx(np.mean(clean == labels), abs=1e-12)
    assert figures["asr"] == pytest.approx(np.mean(triggered[others] == evaluator.target), abs=1e-12)
    # Swapped halves would give other figures here, so the test tells them apart.
    assert (np.mean(triggered == labels), np.mean(clean[others] == evaluator.target)) != (figures["top1"], figures["asr"])
