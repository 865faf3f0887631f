"""Per-epoch passes see the training pairs as the run trains on them: a poisoned run's pass embeds
the poisoned images (their trigger of that epoch) and the poisoned captions, not the clean records."""

import functools

import jax
import numpy as np
from test_train_fake_data import fake_data_config

from bclip import config as run_configs
from bclip import epoch_passes, sharding, train_step
from bclip.data import training_input
from bclip.models import clip


def _by_index(values, indices):
    order = np.argsort(np.asarray(indices))
    return np.asarray(values)[order]


def test_a_poisoned_runs_pass_embeds_the_pairs_it_trains_on(tmp_path, monkeypatch):
    config = run_configs.override(fake_data_config(tmp_path, monkeypatch), {"poison.count": 3, "poison.trigger.size": 4})
    tokenizer = training_input.make_tokenizer(config)
    source, plan, data = training_input.make_training_input(config, config.objective, tokenizer, 0, 1, None)
    batch = next(data)  # epoch 0's one batch: every pair, as the train step gets it
    assert int(np.sum(batch["is_poisoned"])) == 3

    model = clip.build_model(config.model)
    variables = train_step.init_variables(model, jax.random.key(0), config.model.image.size, config.model.text.context_length)
    encode_image = jax.jit(functools.partial(model.apply, method=clip.CLIP.encode_image))
    encode_text = jax.jit(functools.partial(model.apply, method=clip.CLIP.encode_text))
    trained_on = {
        "image": _by_index(encode_image(variables, batch["image"]), batch["index"]),
        "text": _by_index(encode_text(variables, batch["text"]), batch["index"]),
    }

    mesh = sharding.make_mesh()
    context = epoch_passes.PassContext(config, model, mesh, source, len(source), tokenizer, poison_plan=plan, epoch=0)
    embedded = epoch_passes.training_set_embeddings(context, variables, with_text=True)
    valid = np.asarray(embedded["valid"])
    assert valid.sum() == len(source)
    for key in ("image", "text"):
        seen = _by_index(np.asarray(embedded[key])[valid], np.asarray(embedded["index"])[valid])
        np.testing.assert_allclose(seen, trained_on[key], rtol=1e-5, atol=1e-6, err_msg=key)

    # Without the plan, the pass would see the clean records: the poisoned pairs' embeddings differ.
    clean = epoch_passes.training_set_embeddings(
        epoch_passes.PassContext(config, model, mesh, source, len(source), tokenizer), variables, with_text=True
    )
    poisoned_rows = np.sort(np.asarray(batch["index"])[np.asarray(batch["is_poisoned"])])
    for key in ("image", "text"):
        clean_seen = _by_index(np.asarray(clean[key])[valid], np.asarray(clean["index"])[valid])
        assert np.abs(clean_seen[poisoned_rows] - trained_on[key][poisoned_rows]).max() > 1e-3, key
        np.testing.assert_allclose(np.delete(clean_seen, poisoned_rows, 0), np.delete(trained_on[key], poisoned_rows, 0), rtol=1e-5, atol=1e-6)
