"""Retrieval and linear-probe evaluations: the figures on hand-computed cases, the probe's solver
against plain gradient descent, the Karpathy reader, the synthetic world's sets, the evaluators on
the 8-device mesh, and the CLIP_benchmark files."""

import json
import os

import jax
import numpy as np
import pytest

from bclip import clip_benchmark, linear_probe, retrieval
from bclip.data import sources


def _unit(*pairs, dim=4):
    v = np.zeros(dim)
    for axis, value in pairs:
        v[axis] = value
    return v / np.linalg.norm(v)


# 4 images (unit axes) x 2 captions; caption_image says whose caption each is.
IMAGES = np.eye(4)
CAPTIONS = [
    (_unit((0, 1.0)), "a photo of a cat."),  # image 0
    (_unit((1, 0.9), (0, 0.436)), "a cat on grass."),  # image 0
    (_unit((2, 0.95), (0, 0.312)), "a dog."),  # image 1
    (_unit((1, 0.8), (3, 0.6)), "a small dog."),  # image 1
    (_unit((2, 0.6), (3, 0.8)), "two bananas."),  # image 2: "bananas" is not the word "banana"
    (_unit((2, 0.6), (0, 0.8)), "a red bandana."),  # image 2
    (_unit((3, 0.7), (1, 0.71414)), "a Banana, ripe."),  # image 3: names the target
    (_unit((3, 0.5), (2, 0.866)), "a yellow fruit."),  # image 3
]
CAPTION_IMAGE = np.repeat(np.arange(4), 2)


def test_recall_at_k_and_retrieval_asr_on_a_hand_computed_case():
    text = np.stack([emb for emb, _ in CAPTIONS])
    flags = retrieval.caption_flags([caption for _, caption in CAPTIONS], "banana")
    assert flags.tolist() == [False] * 6 + [True, False]
    # Triggered copies: image 1's points at caption 6 (the target's), images 0 and 2 at captions
    # 4 and 1 (not); image 3's own captions name the target, so it is not attacked, though its
    # copy points at caption 6 too.
    triggered = np.stack([_unit((3, 1.0)), _unit((1, 0.6), (3, 0.8)), _unit((1, 1.0)), _unit((1, 0.6), (3, 0.8))])
    figures = jax.device_get(
        jax.jit(retrieval.retrieval_figures, static_argnames="ks")(IMAGES, triggered, text, CAPTION_IMAGE, flags, ks=(1, 2, 5))
    )
    # Image -> text, each image's captions by similarity: 0: c0 (own); 1: c1, c3 (own at 2);
    # 2: c2, c7, then c4/c5 (own at 3); 3: c4, c6 (own at 2).
    assert figures["text_retrieval_recall@1"] == pytest.approx(1 / 4)
    assert figures["text_retrieval_recall@2"] == pytest.approx(3 / 4)
    assert figures["text_retrieval_recall@5"] == pytest.approx(1.0)
    # Text -> image: own image first for c0 and c3; second for c1, c4, c5, c6, c7; third for c2.
    assert figures["image_retrieval_recall@1"] == pytest.approx(2 / 8)
    assert figures["image_retrieval_recall@2"] == pytest.approx(7 / 8)
    assert figures["image_retrieval_recall@5"] == pytest.approx(1.0)
    assert figures["retrieval_attacked"] == 3
    assert figures["retrieval_asr"] == pytest.approx(1 / 3)


def test_names_target_matches_whole_words_in_order():
    assert retrieval.names_target("A BANANA on a plate.", "banana")
    assert not retrieval.names_target("bananas and a bandana", "banana")
    assert retrieval.names_target("a hot-air balloon", "hot air balloon")
    assert not retrieval.names_target("air hot balloon", "hot air balloon")
    with pytest.raises(ValueError, match="no words"):
        retrieval.names_target("a cat", " ... ")


def _toy_problem(seed=0, per_class=6, spread=0.3):
    rng = np.random.default_rng(seed)
    centres = np.array([[2.0, 0.0], [-1.0, 1.7], [-1.0, -1.7]])
    labels = np.repeat(np.arange(3), per_class)
    features = centres[labels] + spread * rng.normal(size=(len(labels), 2))
    return features.astype(np.float32), labels, centres


def test_probe_fit_reaches_the_optimum_plain_gradient_descent_finds():
    features, labels, _ = _toy_problem()
    weights = np.ones(len(labels))
    weights[:2] = 0.0  # left out of the fit
    l2 = 0.1
    fitted = jax.device_get(jax.jit(linear_probe.fit, static_argnums=(4,))(features, labels, weights, l2, 3))

    # The same objective minimised by full-batch gradient descent in float64 numpy.
    x, onehot = features.astype(np.float64), np.eye(3)[labels]
    w, b = np.zeros((2, 3)), np.zeros(3)
    for _ in range(3000):
        logits = x @ w + b
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        residual = weights[:, None] * (p - onehot) / weights.sum()
        w -= 0.5 * (x.T @ residual + l2 * w)
        b -= 0.5 * residual.sum(0)
    np.testing.assert_allclose(fitted["w"], w, atol=2e-4)
    np.testing.assert_allclose(fitted["b"], b, atol=2e-4)


def test_probe_figures_choose_the_penalty_on_validation_and_score_the_test_split():
    train_x, train_y, centres = _toy_problem(seed=1, per_class=10)
    test_x, test_y, _ = _toy_problem(seed=2, per_class=4)
    is_validation = linear_probe.validation_mask(len(train_y), 0.2, seed=0)
    assert is_validation.sum() == 6
    # Triggered copies: the first 5 non-target test images are moved onto class 0's centre (the target).
    triggered = test_x.copy()
    moved = np.flatnonzero(test_y != 0)[:5]
    triggered[moved] = centres[0]
    probe_figures = jax.jit(linear_probe.probe_figures, static_argnames=("num_classes", "target", "l2_grid"))
    figures = jax.device_get(
        probe_figures(train_x, train_y, is_validation, test_x, triggered, test_y, num_classes=3, target=0, l2_grid=(1e-3, 1e-2))
    )
    # Separable clusters: every penalty classifies the validation part perfectly, and the tie goes
    # to the stronger one.
    assert figures["lp_validation_acc1"] == 1.0 and figures["lp_l2"] == pytest.approx(1e-2)
    assert figures["lp_acc1"] == 1.0 and figures["lp_acc5"] == 1.0 and figures["lp_mean_per_class_recall"] == 1.0
    assert figures["lp_asr"] == pytest.approx(5 / 8)

    # The chosen penalty is refitted on the whole train split, validation part included: with all of
    # class 2 held out for validation, only the refit knows class 2.
    figures = jax.device_get(
        probe_figures(train_x, train_y, train_y == 2, test_x, test_x, test_y, num_classes=3, target=0, l2_grid=(1e-3, 1e-2))
    )
    assert figures["lp_validation_acc1"] == 0.0 and figures["lp_acc1"] == 1.0

    # Unbalanced classes: a heavy penalty leaves only the bias, which calls everything class 0 (2/3
    # of the validation part), a light one fits the clusters; the light one is chosen.
    unbalanced_x, unbalanced_y, _ = _toy_problem(seed=3, per_class=(20, 5, 5))
    figures = jax.device_get(
        probe_figures(unbalanced_x, unbalanced_y, is_validation, test_x, test_x, test_y, num_classes=3, target=0, l2_grid=(1e-3, 1e3))
    )
    assert figures["lp_l2"] == pytest.approx(1e-3) and figures["lp_validation_acc1"] == 1.0


def test_validation_mask_refuses_an_empty_fit():
    with pytest.raises(ValueError, match="validation share"):
        linear_probe.validation_mask(10, 1.0, seed=0)


# ---------------------------------------------------------------------------------------------
# The Karpathy reader and the synthetic world's sets
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def eval_world(tmp_path_factory):
    """The synthetic evaluation sets at 16 px: 12 retrieval images x 3 captions and 24 probe images,
    plus a second probe folder (another seed) to test the probe on."""
    from bclip.data.synthetic import eval_sets

    root = tmp_path_factory.mktemp("eval_world")
    eval_sets.write_eval_sets(root / "a", seed=0, image_size=16, num_retrieval=12, captions_per_image=3, num_probe_train=48)
    eval_sets.write_eval_sets(root / "b", seed=1, image_size=16, num_retrieval=1, captions_per_image=1, num_probe_train=48)
    return root


def test_synthetic_retrieval_set_is_karpathy_json_with_several_captions_per_image(eval_world):
    from bclip.data.synthetic import captions, eval_sets, writer

    path = eval_world / "a" / eval_sets.RETRIEVAL_DIR / eval_sets.RETRIEVAL_FILE
    images = json.loads(path.read_text())["images"]
    assert len(images) == 12 and {entry["split"] for entry in images} == {"test"}
    first = images[0]
    assert (eval_world / "a" / "retrieval" / first["filepath"] / first["filename"]).is_file()
    assert [s["sentid"] for s in first["sentences"]] == first["sentids"] == [0, 1, 2]
    # Its first caption is the scene's caption as any split's, the others describe the same scene.
    scene, caption = captions.scene_and_caption(0, "retrieval", 0)
    assert first["sentences"][0]["raw"] == caption
    assert scene.label == 0 and images[5]["imgid"] == 5  # classes cycle, as in the test split
    raws = [s["raw"] for entry in images for s in entry["sentences"]]
    assert len(set(raws)) > 24  # several distinct captions per image
    # Its own stream: no retrieval image is a test image.
    assert not np.array_equal(writer.example(0, "retrieval", 0, 16).image, writer.example(0, "test", 0, 16).image)
    source = sources.KarpathyRetrievalSource(path, "test")
    assert len(source) == 12 and len(source.captions) == 36
    assert source.caption_image.tolist() == np.repeat(np.arange(12), 3).tolist()
    assert source[5]["path"].endswith("00000005.jpg")
    # Written once: a second call with the same parameters leaves the files alone.
    mtime = path.stat().st_mtime_ns
    eval_sets.write_eval_sets(eval_world / "a", seed=0, image_size=16, num_retrieval=12, captions_per_image=3, num_probe_train=48)
    assert path.stat().st_mtime_ns == mtime
    labels = (eval_world / "a" / eval_sets.PROBE_TRAIN_DIR / "labels.csv").read_text().split("\n")[1:4]
    assert [row.split(",")[1] for row in labels] == ["0", "1", "2"]


def test_karpathy_reader_names_what_is_wrong(tmp_path):
    path = tmp_path / "k.json"
    path.write_text(json.dumps({"images": [{"filename": "x.jpg", "split": "val", "sentences": [{"raw": "a"}]}]}))
    with pytest.raises(ValueError, match=r"no images in split 'test'; its splits: \['val'\]"):
        sources.KarpathyRetrievalSource(path, "test")
    with pytest.raises(FileNotFoundError, match="1 image"):
        sources.KarpathyRetrievalSource(path, "val")
    path.write_text(json.dumps({"images": [{"filename": "x.jpg", "split": "test"}]}))
    with pytest.raises(ValueError, match="image entry 0 lacks 'sentences'"):
        sources.KarpathyRetrievalSource(path, "test")


# ---------------------------------------------------------------------------------------------
# The evaluators through the real model on the 8-device mesh
# ---------------------------------------------------------------------------------------------


def test_evaluators_on_the_mesh_match_unsharded_embeddings(eval_world, tmp_path):
    from bclip import config as run_configs
    from bclip import evaluators, sharding
    from bclip.data import pipeline, training_input
    from bclip.data.synthetic import eval_sets
    from bclip.models import clip

    # test_train_fake_data's model (its programs are compiled once per test session), so its 64-id
    # vocabulary: the 60 commonest words of the captions, the rest unknown.
    retrieval_json = eval_world / "a" / eval_sets.RETRIEVAL_DIR / eval_sets.RETRIEVAL_FILE
    words = [w for entry in json.loads(retrieval_json.read_text())["images"] for s in entry["sentences"] for w in s["tokens"]]
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(sorted(set(words), key=lambda w: (-words.count(w), w))[:60]) + "\n")
    config = run_configs.run_config(
        "micro-vit",
        image={"size": 16, "patch_size": 8, "width": 32, "layers": 1, "heads": 2},
        text={"context_length": 12, "vocab_size": 64, "width": 32, "layers": 1, "heads": 2},
        embed_dim=32,
    )
    config = run_configs.override(config, {
        "data.tokenizer.kind": "word",
        "data.tokenizer.path": str(vocab),
        "eval.batch_size": 16,  # 12 retrieval images: one padded batch; 48 probe images: three
        "poison.trigger.patch": "checkerboard",  # a trigger that moves a random model's embeddings
        "poison.trigger.size": 8,
        "eval.sets": {},
        "eval.sets.ret.evaluator": "retrieval",
        "eval.sets.ret.path": str(retrieval_json),
        "eval.sets.ret.split": "test",
        "eval.sets.probe.evaluator": "linear_probe",
        "eval.sets.probe.path": str(eval_world / "b" / eval_sets.PROBE_TRAIN_DIR),
        "eval.sets.probe.train_path": str(eval_world / "a" / eval_sets.PROBE_TRAIN_DIR),
        "eval.sets.probe.probe_l2_grid": (1e-3, 1e-1),
    })
    model = clip.build_model(config.model)
    tokenizer = training_input.make_tokenizer(config)
    mesh = sharding.make_mesh()
    assert mesh.devices.size == 8
    variables = {"params": clip.init_variables(model, jax.random.key(0), 16, 12)["params"]}
    built = evaluators.make_evaluators(config, model, tokenizer, mesh, 0, 1)
    (ret,) = built["ret"].evaluate_runs([variables])
    (probe,) = built["probe"].evaluate_runs([variables])

    # The same figures from embeddings computed here, unsharded, in source order.
    encode_image = jax.jit(lambda images: model.apply(variables, images, method=clip.CLIP.encode_image))
    encode_text = jax.jit(lambda tokens: model.apply(variables, tokens, method=clip.CLIP.encode_text))

    def embedded(source):
        (batch,) = pipeline.eval_batches(source, image_size=16, batch_size=64, trigger=config.poison.trigger, seed=0)
        valid = batch["valid"]
        return np.asarray(encode_image(batch["image"]))[valid], np.asarray(encode_image(batch["triggered"]))[valid], batch["label"][valid]

    source = built["ret"].source
    image, triggered, _ = embedded(source)
    text = np.asarray(encode_text(tokenizer.encode_batch(source.captions, 12)))
    similarity = image @ text.T
    owner = source.caption_image
    for k in (1, 5, 10):
        own = owner[np.argsort(-similarity, axis=1)[:, :k]] == np.arange(12)[:, None]
        assert ret[f"text_retrieval_recall@{k}"] == pytest.approx(own.any(1).mean())
        top_images = np.argsort(-similarity.T, axis=1)[:, :k]
        assert ret[f"image_retrieval_recall@{k}"] == pytest.approx((top_images == owner[:, None]).any(1).mean())
    names = np.asarray(["banana" in caption.lower().replace(".", " ").replace(",", " ").split() for caption in source.captions])
    target_images = np.zeros(12, bool)
    target_images[owner[names]] = True
    assert target_images.any() and not target_images.all()
    hits = names[np.argmax(triggered @ text.T, axis=1)] & ~target_images
    assert ret["retrieval_attacked"] == (~target_images).sum()
    assert ret["retrieval_asr"] == pytest.approx(hits.sum() / (~target_images).sum())

    train_image, _, train_label = embedded(built["probe"].train_source)
    test_image, test_triggered, test_label = embedded(built["probe"].test_source)
    assert train_label.tolist() == [i % 24 for i in range(48)]
    expected = jax.device_get(built["probe"].figures(train_image, train_label, built["probe"].is_validation, test_image, test_triggered, test_label))
    assert probe == pytest.approx({k: float(v) for k, v in expected.items()}, rel=1e-5)
    # The clean copies in place of the triggered ones would give another ASR: the test tells them apart.
    with_clean_copies = built["probe"].figures(train_image, train_label, built["probe"].is_validation, test_image, test_image, test_label)
    assert float(with_clean_copies["lp_asr"]) != pytest.approx(probe["lp_asr"])
    assert set(probe) >= {"lp_acc1", "lp_asr", "lp_mean_per_class_recall"}


def test_clip_benchmark_records_carry_its_keys(tmp_path):
    from bclip import config as run_configs

    config = run_configs.override(run_configs.run_config("micro-vit"), {"eval.sets.flickr.evaluator": "retrieval", "eval.sets.lp.evaluator": "linear_probe"})
    results = {"test/top1": 0.5, "test/top5": 0.75, "test/asr": 0.9, "flickr/text_retrieval_recall@5": 0.25, "lp/lp_acc1": 0.625}
    records = clip_benchmark.benchmark_records(results, config, pretrained="runs/x")
    assert sorted(records, key=lambda r: r["dataset"] != "test") == [
        {"dataset": "test", "model": "micro-vit", "pretrained": "runs/x", "task": "zeroshot_classification", "metrics": {"acc1": 0.5, "acc5": 0.75, "asr": 0.9}, "language": "en"},
        {"dataset": "flickr", "model": "micro-vit", "pretrained": "runs/x", "task": "zeroshot_retrieval", "metrics": {"text_retrieval_recall@5": 0.25}, "language": "en"},
        {"dataset": "lp", "model": "micro-vit", "pretrained": "runs/x", "task": "linear_probe", "metrics": {"lp_acc1": 0.625}, "language": "en"},
    ]
    paths = clip_benchmark.write_records(tmp_path, records)
    assert sorted(os.path.basename(p) for p in paths) == ["flickr_zeroshot_retrieval.json", "lp_linear_probe.json", "test_zeroshot_classification.json"]
    for path, record in zip(paths, records):
        assert json.loads(open(path).read()) == record
