"""Perturb and Recover (PAR): its term against numpy, its gradient, its weight 0, and a run that
has no model to start from. Its cleaning run, sharded over 8 devices, is in test_train.py."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_train_fake_data import fake_data_config

from bclip import config as run_configs
from bclip import experiment, objectives, train


def _unit(rng, shape):
    x = rng.normal(size=shape)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _np_gated_distance(emb, reference, threshold):
    distance = np.mean(np.sum((emb - reference) ** 2, axis=-1))
    return 0.0 if distance > threshold else distance


def test_par_loss_is_minus_half_the_gated_mean_squared_distances():
    rng = np.random.default_rng(0)
    image, text = _unit(rng, (6, 5)), _unit(rng, (6, 5))
    # Images near their reference (small distance), captions pointing the other way (distance 4).
    near = image + 0.1 * _unit(rng, (6, 5))
    near /= np.linalg.norm(near, axis=-1, keepdims=True)
    image_distance = np.mean(np.sum((image - near) ** 2, axis=-1))
    assert 0.0 < image_distance < 0.1
    par = jax.jit(objectives.par_loss)
    args = [jnp.asarray(x, jnp.float32) for x in (image, text, near, -text)]
    # Past τ = 2.15 the captions' part is 0: only the images' distance counts.
    np.testing.assert_allclose(par(*args), -0.5 * image_distance, rtol=1e-5)
    np.testing.assert_allclose(
        par(*args, threshold=4.5),
        -0.5 * (_np_gated_distance(image, near, 4.5) + _np_gated_distance(text, -text, 4.5)),
        rtol=1e-5,
    )
    assert _np_gated_distance(text, -text, 4.5) == pytest.approx(4.0)
    # Both towers far enough apart: the term is 0, whatever the threshold below their distance.
    np.testing.assert_allclose(par(args[0], args[1], -args[0], -args[1], threshold=3.9), 0.0, atol=0)


def test_par_gradient_pushes_the_embeddings_away_from_the_reference_until_the_threshold():
    rng = np.random.default_rng(1)
    image, text, reference_image, reference_text = (jnp.asarray(_unit(rng, (4, 3)), jnp.float32) for _ in range(4))
    grads = jax.grad(objectives.par_loss, argnums=(0, 1, 2, 3))
    # τ = 4 keeps both parts: d/de of -½·mean_i |e_i - e0_i|² is -(e - e0)/B, so a descent step
    # moves each embedding along (e - e0), away from the reference; none flows into the reference.
    g_image, g_text, g_ref_image, g_ref_text = grads(image, text, reference_image, reference_text, 4.0)
    np.testing.assert_allclose(g_image, -(np.asarray(image) - np.asarray(reference_image)) / 4, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(g_text, -(np.asarray(text) - np.asarray(reference_text)) / 4, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(g_ref_image, 0.0)
    np.testing.assert_array_equal(g_ref_text, 0.0)
    stepped = np.asarray(image - 0.1 * g_image)
    assert np.all(np.sum((stepped - np.asarray(reference_image)) ** 2, -1) > np.sum((np.asarray(image) - np.asarray(reference_image)) ** 2, -1))
    # τ below the images' distance: their gradient is 0, the captions' is not.
    image_distance = float(np.mean(np.sum((np.asarray(image) - np.asarray(reference_image)) ** 2, -1)))
    text_distance = float(np.mean(np.sum((np.asarray(text) - np.asarray(reference_text)) ** 2, -1)))
    assert text_distance < image_distance, "the case needs the captions closer than the images"
    threshold = (image_distance + text_distance) / 2
    g_image, g_text, _, _ = grads(image, text, reference_image, reference_text, threshold)
    np.testing.assert_array_equal(g_image, 0.0)
    np.testing.assert_allclose(g_text, -(np.asarray(text) - np.asarray(reference_text)) / 4, rtol=1e-5, atol=1e-7)


def test_par_at_weight_zero_is_the_cleanclip_loss_and_its_threshold_is_an_objective_key():
    rng = np.random.default_rng(2)
    i, t, ia, ta, i0, t0 = (jnp.asarray(_unit(rng, (8, 4)), jnp.float32) for _ in range(6))
    inputs = {
        "image": i, "text": t, "aug_image": ia, "aug_text": ta, "reference_image": i0, "reference_text": t0,
        "logit_scale": jnp.float32(1.2), "logit_bias": None,
    }
    par = objectives.objective_config(mmcl=1.0, ssl=1.0, par=1.0)
    assert par.par_threshold == 2.15 and objectives.needs_reference(par)
    assert not objectives.needs_reference(objectives.objective_config(mmcl=1.0, ssl=1.0))
    cleanclip_total, cleanclip_terms = objectives.combined_loss(inputs, objectives.objective_config(mmcl=1.0, ssl=1.0))
    hparams = {"mmcl_weight": 1.0, "ssl_weight": 1.0, "par_weight": 0.0}
    total, terms = objectives.combined_loss(inputs, par, hparams)
    np.testing.assert_allclose(total, cleanclip_total, rtol=1e-6)
    np.testing.assert_allclose(terms["mmcl"], cleanclip_terms["mmcl"], rtol=1e-6)
    np.testing.assert_allclose(terms["ssl"], cleanclip_terms["ssl"], rtol=1e-6)
    # At weight 1 it adds the term, read with the configured threshold.
    par.par_threshold = 4.0
    total, terms = objectives.combined_loss(inputs, par)
    expected = -0.5 * (_np_gated_distance(np.asarray(i), np.asarray(i0), 4.0) + _np_gated_distance(np.asarray(t), np.asarray(t0), 4.0))
    np.testing.assert_allclose(terms["par"], expected, rtol=1e-5)
    np.testing.assert_allclose(total, cleanclip_total + expected, rtol=1e-5)


def test_par_without_a_starting_model_fails_before_training(tmp_path, monkeypatch):
    config = run_configs.override(fake_data_config(tmp_path, monkeypatch), {"objective.par_weight": 1.0})
    with pytest.raises(ValueError, match=r"\['mmcl', 'par'\] push the model away .* train.init_from must name"):
        train.train_and_evaluate(config, str(tmp_path / "run"))


def test_the_study_cleans_with_par_only_when_asked_and_as_it_cleans_with_cleanclip():
    study_synthetic = run_configs.load_config_file(
        os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "configs", "study_synthetic.py")
    )
    default, with_par = study_synthetic.get_config("default"), study_synthetic.get_config("par")
    assert list(default.cleaning_methods) == ["CleanCLIP"] and list(with_par.cleaning_methods) == ["CleanCLIP", "PAR"]
    with with_par.unlocked():
        del with_par.cleaning_methods["PAR"]
    assert with_par.to_dict() == default.to_dict()
    # A PAR run of the grid differs from CleanCLIP's only in its loss and PAR's AdamW β2 and weight decay.
    study = experiment.apply_proportions(study_synthetic.get_config("par"))
    pretrain = experiment.pretrain_configs(study, "/world")["MMCL+SSL"]
    runs = {
        method: experiment.clean_config(study, pretrain, "/pretrain", method, 2e-4).to_dict() for method in ("CleanCLIP", "PAR")
    }
    assert {section for section in runs["PAR"] if runs["PAR"][section] != runs["CleanCLIP"][section]} == {"objective", "optim"}
    assert runs["PAR"]["objective"] == {**runs["CleanCLIP"]["objective"], "ssl_weight": 0.0, "par_weight": 1.0}
    assert runs["PAR"]["optim"] == {**runs["CleanCLIP"]["optim"], "b2": 0.98, "weight_decay": 1e-4}
    assert runs["PAR"]["objective"]["par_threshold"] == 2.15 and runs["PAR"]["optim"]["learning_rate"] == 2e-4
