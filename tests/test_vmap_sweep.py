"""Vectorised sweeps: each vmapped run equals its own sequential run; hyperparameters, stacking, meshes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bclip import config as run_configs
from bclip import objectives, optim, sharding, train_step, vmap_sweep
from bclip.models import clip

TOTAL_STEPS = 8
WARMUP_STEPS = 2
NUM_STEPS = 4  # two warm-up updates (the first at lr 0), then the cosine part
BATCH_SIZE = 16
# Three cleaning runs: MMCL-only, CleanCLIP, CleanCLIP with a heavier SSL term and strong decay.
LEARNING_RATES = [1e-3, 3e-3, 5e-4]
SSL_WEIGHTS = [0.0, 1.0, 2.0]
WEIGHT_DECAYS = [0.0, 0.1, 1.0]


def _optim_config(**overrides):
    # Some gradients are exactly zero in exact arithmetic (e.g. the attention key bias, which softmax
    # ignores); with Adam's eps of 1e-8, round-off in them (whose value depends on how XLA orders a
    # reduction, which differs between the vmapped and the single-run program) becomes a full ±lr
    # step. eps=1e-3 turns round-off of ~1e-9 into nothing while real gradients still move the
    # parameters by a good part of a step.
    return optim.optim_config(warmup_steps=WARMUP_STEPS, eps=1e-3, **overrides)


def _batch(model_config, seed):
    rng = np.random.default_rng(seed)
    size, ctx, vocab = model_config.image.size, model_config.text.context_length, model_config.text.vocab_size

    def tokens():
        t = np.zeros((BATCH_SIZE, ctx), np.int32)
        for row, n in enumerate(rng.integers(2, ctx - 1, size=BATCH_SIZE)):
            t[row, 0] = vocab - 2
            t[row, 1:n] = rng.integers(1, vocab - 2, size=n - 1)
            t[row, n] = vocab - 1
        return t

    images = lambda: rng.integers(0, 256, (BATCH_SIZE, size, size, 3), dtype=np.uint8)
    return {"image": images(), "text": tokens(), "aug_image": images(), "aug_text": tokens()}


def _assert_trees_close(a, b, rtol, atol, what=""):
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(x, y, rtol=rtol, atol=atol, err_msg=what + jax.tree_util.keystr(path))


@pytest.fixture(scope="module")
def sweep():
    """micro-vit on the 8-device data mesh, a 'pretrained' start, the jitted vectorised step."""
    model_config = clip.model_config("micro-vit")
    model = clip.build_model(model_config)
    mesh = sharding.make_mesh()
    variables = jax.device_get(
        train_step.init_variables(model, jax.random.key(0), model_config.image.size, model_config.text.context_length)
    )
    template = objectives.objective_config(mmcl=1.0, ssl=1.0)
    optim_config = _optim_config()
    step = vmap_sweep.make_vectorised_train_step(model, template, optim_config, TOTAL_STEPS)

    def start(num_runs):
        states = vmap_sweep.stack_states(vmap_sweep.init_sweep_state(vmap_sweep.make_sweep_optimizer(optim_config), variables), num_runs)
        shardings = vmap_sweep.sweep_state_shardings(states, mesh)
        return jax.device_put(states, shardings), shardings

    _, shardings = start(len(LEARNING_RATES))
    jitted = vmap_sweep.shard_and_jit_vectorised_step(step, shardings, mesh)
    batches = [jax.device_put(_batch(model_config, seed), sharding.batch_sharding(mesh)) for seed in range(NUM_STEPS)]
    hparams = vmap_sweep.sweep_hyperparams(
        len(LEARNING_RATES), optim_config, template,
        learning_rate=LEARNING_RATES, ssl_weight=SSL_WEIGHTS, weight_decay=WEIGHT_DECAYS,
    )
    return dict(model=model, model_config=model_config, mesh=mesh, variables=variables, template=template,
                optim_config=optim_config, step=step, jitted=jitted, start=start, batches=batches, hparams=hparams)


def _sequential_run(sweep, run):
    """Run `run` alone, with bclip.train_step and its own optimiser and objective."""
    optim_config = _optim_config(learning_rate=LEARNING_RATES[run], weight_decay=WEIGHT_DECAYS[run])
    tx = optim.make_optimizer(optim_config, TOTAL_STEPS)
    objective = objectives.objective_config(mmcl=1.0, ssl=SSL_WEIGHTS[run])
    mesh = sweep["mesh"]
    state = {"params": sweep["variables"]["params"], "batch_stats": {}, "opt": tx.init(sweep["variables"]["params"]), "step": jnp.zeros((), jnp.int32)}
    shardings = jax.tree.map(lambda _: sharding.replicated(mesh), state)
    state = jax.device_put(state, shardings)
    step = train_step.shard_and_jit_train_step(train_step.make_train_step(sweep["model"], tx, objective), shardings, mesh)
    history = []
    for i, batch in enumerate(sweep["batches"]):
        state, metrics = step(state, batch, jax.random.key(i))
        history.append(jax.device_get(metrics))
    return jax.device_get(state["params"]), history


def test_stack_unstack_and_per_run_inits(sweep):
    # The first test to use the `sweep` fixture, so it carries its set-up (initialising the model).
    model, model_config = sweep["model"], sweep["model_config"]
    tx = vmap_sweep.make_sweep_optimizer(optim.optim_config())
    size, ctx = model_config.image.size, model_config.text.context_length
    rngs = jax.random.split(jax.random.key(3), 2)
    states = jax.jit(lambda r: vmap_sweep.init_sweep_states(model, tx, r, size, ctx))(rngs)
    single = train_step.init_state(model, tx, rngs[1], size, ctx)
    _assert_trees_close(vmap_sweep.unstack_run(states, 1), single, rtol=1e-6, atol=1e-7)
    first = jax.tree.leaves(states["params"])[0]
    assert not np.allclose(first[0], first[1])

    restacked = vmap_sweep.stack_run_states([vmap_sweep.unstack_run(states, r) for r in (1, 0)])
    _assert_trees_close(vmap_sweep.unstack_run(restacked, 0), single, rtol=0, atol=0)
    copies = vmap_sweep.stack_states(single, 3)
    assert jax.tree.leaves(copies)[0].shape[0] == 3
    _assert_trees_close(vmap_sweep.unstack_run(copies, 2), single, rtol=0, atol=0)


@pytest.fixture(scope="module")
def vectorised(sweep):
    """The three runs trained together: per-step metrics {key: [N]} and final params [N, ...]."""
    states, _ = sweep["start"](len(LEARNING_RATES))
    history = []
    for i, batch in enumerate(sweep["batches"]):
        states, metrics = sweep["jitted"](states, batch, jax.random.key(i), sweep["hparams"])
        history.append(jax.device_get(metrics))
    return jax.device_get(states["params"]), history


def test_each_run_weighs_the_loss_terms_with_its_own_weights(vectorised):
    # The first test to use the `vectorised` fixture, so it carries its set-up (the vectorised compile).
    _, history = vectorised
    first = history[0]
    assert first["loss"].shape == (len(LEARNING_RATES),)
    np.testing.assert_allclose(first["loss"], first["mmcl"] + np.asarray(SSL_WEIGHTS) * first["ssl"], rtol=1e-6)
    # Same start, same batch: the unweighted terms agree across runs at the first step.
    np.testing.assert_allclose(first["mmcl"], first["mmcl"][0], rtol=1e-6)
    np.testing.assert_allclose(first["ssl"], first["ssl"][0], rtol=1e-6)


# One test per run: each compiles its own single-run step, as a sequential sweep would.
@pytest.mark.parametrize("run", range(len(LEARNING_RATES)))
def test_each_vectorised_run_matches_its_sequential_run(sweep, vectorised, run):
    params, history = vectorised
    sequential_params, sequential_history = _sequential_run(sweep, run)
    for t, (together, alone) in enumerate(zip(history, sequential_history, strict=True)):
        what = f"run {run} step {t}: "
        for key in ("loss", "mmcl", "temperature"):
            np.testing.assert_allclose(together[key][run], alone[key], rtol=2e-5, err_msg=what + key)
        if SSL_WEIGHTS[run]:
            np.testing.assert_allclose(together["ssl"][run], alone["ssl"], rtol=2e-5, err_msg=what + "ssl")
        np.testing.assert_allclose(together["grad_norm"][run], alone["grad_norm"], rtol=1e-4, err_msg=what)
        # The same warm-up + cosine shape, scaled by each run's own peak.
        np.testing.assert_allclose(together["learning_rate"][run], alone["learning_rate"], rtol=1e-6, atol=1e-12, err_msg=what)
    _assert_trees_close(jax.tree.map(lambda x: x[run], params), sequential_params, rtol=1e-4, atol=2e-6, what=f"run {run}: ")


def test_runs_differ_by_far_more_than_the_tolerance(vectorised):
    params, history = vectorised
    np.testing.assert_array_equal(history[0]["learning_rate"], 0.0)  # warm-up starts at 0
    np.testing.assert_allclose(history[1]["learning_rate"], np.asarray(LEARNING_RATES) / 2, rtol=1e-6)
    for other in (1, 2):
        delta = max(np.max(np.abs(leaf[0] - leaf[other])) for leaf in jax.tree.leaves(params))
        assert delta > 1e-3, (other, delta)


def test_temperature_clamp_applies_per_run(sweep):
    states, shardings = sweep["start"](len(LEARNING_RATES))
    # Run 0 starts inside [0, log 100], run 1 above it and run 2 below it.
    logit_scale = np.array([np.log(1 / 0.07), np.log(100.0) + 0.5, -0.5], np.float32)
    states["params"] = {**states["params"], "logit_scale": jax.device_put(logit_scale, shardings["params"]["logit_scale"])}
    states, metrics = sweep["jitted"](states, sweep["batches"][0], jax.random.key(0), sweep["hparams"])
    # The first update is at lr 0, so only the clamp moves a scale: each run lands exactly on its own
    # bound, or keeps its start.
    np.testing.assert_array_equal(np.asarray(metrics["learning_rate"]), 0.0)
    expected = np.array([np.log(1 / 0.07), np.log(100.0), 0.0], np.float32)
    np.testing.assert_array_equal(np.asarray(states["params"]["logit_scale"]), expected)
    np.testing.assert_allclose(metrics["temperature"], np.exp(expected.astype(np.float64)), rtol=1e-6)


def test_runs_split_over_a_second_mesh_axis_match_replicated_runs(sweep, vectorised):
    """Two runs on a (runs: 2, data: 4) mesh give what the same runs gave on the 1-D data mesh."""
    num_runs = 2
    hparams = {k: v[:num_runs] for k, v in sweep["hparams"].items()}
    mesh = vmap_sweep.make_sweep_mesh(run_shards=2)
    assert dict(mesh.shape) == {vmap_sweep.RUN_AXIS: 2, sharding.DATA_AXIS: 4}
    states = vmap_sweep.stack_states(
        vmap_sweep.init_sweep_state(vmap_sweep.make_sweep_optimizer(sweep["optim_config"]), sweep["variables"]), num_runs
    )
    shardings = vmap_sweep.sweep_state_shardings(states, mesh)
    states = jax.device_put(states, shardings)
    step = vmap_sweep.shard_and_jit_vectorised_step(sweep["step"], shardings, mesh)
    history = []
    for i, batch in enumerate(sweep["batches"]):
        batch = jax.device_put(jax.device_get(batch), sharding.batch_sharding(mesh))
        states, metrics = step(states, batch, jax.random.key(i), hparams)
        history.append(jax.device_get(metrics))
    kernel = jax.tree.leaves(states["params"])[0]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec(vmap_sweep.RUN_AXIS)
    assert kernel.addressable_shards[0].data.shape[0] == 1  # each device holds one run's copy

    replicated_params, replicated_history = vectorised
    for split, replicated in zip(history, replicated_history, strict=True):
        np.testing.assert_allclose(split["loss"], replicated["loss"][:num_runs], rtol=2e-5)
    _assert_trees_close(jax.device_get(states["params"]), jax.tree.map(lambda x: x[:num_runs], replicated_params), rtol=1e-4, atol=2e-6)


@pytest.mark.parametrize("run_loop", ["map", "dispatch"])
def test_other_run_loops_give_what_vmap_gives(sweep, vectorised, run_loop):
    """The runs looped over inside the program (lax.map), or stepped one at a time by one compiled
    single-run program, train exactly as the vmapped runs do."""
    step = vmap_sweep.make_vectorised_train_step(
        sweep["model"], sweep["template"], sweep["optim_config"], TOTAL_STEPS, run_loop=run_loop
    )
    states, shardings = sweep["start"](len(LEARNING_RATES))
    jitted = vmap_sweep.shard_and_jit_vectorised_step(step, shardings, sweep["mesh"])
    history = []
    for i, batch in enumerate(sweep["batches"]):
        states, metrics = jitted(states, batch, jax.random.key(i), sweep["hparams"])
        history.append(jax.device_get(metrics))
    vmapped_params, vmapped_history = vectorised
    for looped, vmapped in zip(history, vmapped_history, strict=True):
        assert looped.keys() == vmapped.keys()
        for key in looped:
            np.testing.assert_allclose(looped[key], vmapped[key], rtol=2e-5, atol=1e-12, err_msg=key)
    _assert_trees_close(jax.device_get(states["params"]), vmapped_params, rtol=1e-4, atol=2e-6)
    with pytest.raises(ValueError, match="run_loop must be one of"):
        vmap_sweep.make_vectorised_train_step(sweep["model"], sweep["template"], sweep["optim_config"], 8, "scan")


def test_learning_rate_multiplier_times_peak_is_the_run_schedule():
    multiplier = vmap_sweep.learning_rate_multiplier(optim.optim_config(warmup_steps=5), 40)
    for peak in (1e-5, 3e-4, 2e-2):
        schedule = optim.learning_rate_schedule(optim.optim_config(warmup_steps=5, learning_rate=peak), 40)
        for t in (0, 1, 4, 5, 6, 20, 39, 40):
            np.testing.assert_allclose(peak * multiplier(t), schedule(t), rtol=1e-6, atol=1e-12)


def test_sweep_hyperparams_broadcast_and_validate():
    template = objectives.objective_config(mmcl=1.0, ssl=1.0)
    hparams = vmap_sweep.sweep_hyperparams(3, optim.optim_config(weight_decay=0.2), template, learning_rate=[1e-5, 2e-5, 3e-5], ssl_weight=0.5)
    assert set(hparams) == set(vmap_sweep.HYPERPARAMS)
    np.testing.assert_allclose(hparams["learning_rate"], [1e-5, 2e-5, 3e-5])
    np.testing.assert_allclose(hparams["ssl_weight"], [0.5, 0.5, 0.5])
    np.testing.assert_allclose(hparams["weight_decay"], [0.2, 0.2, 0.2])
    np.testing.assert_allclose(hparams["siglip_weight"], [0.0, 0.0, 0.0])
    assert all(v.dtype == np.float32 for v in hparams.values())
    with pytest.raises(ValueError, match="expected 3 values"):
        vmap_sweep.sweep_hyperparams(3, optim.optim_config(), template, learning_rate=[1e-5, 2e-5])
    with pytest.raises(ValueError, match="does not compute the 'siglip' term"):
        vmap_sweep.sweep_hyperparams(3, optim.optim_config(), template, siglip_weight=[0.0, 1.0, 0.0])
    with pytest.raises(ValueError, match="unknown sweep hyperparameters"):
        vmap_sweep.sweep_hyperparams(3, optim.optim_config(), template, warmup_steps=[1, 2, 3])


def test_sweep_from_configs_splits_shared_and_per_run_settings():
    configs = []
    for lr, ssl in [(1e-5, 0.0), (3e-5, 1.0)]:
        config = run_configs.run_config("micro-vit")
        config.optim.learning_rate = lr
        config.objective.ssl_weight = ssl
        configs.append(config)
    template, optim_config, hparams = vmap_sweep.sweep_from_configs(configs)
    assert vmap_sweep.active_terms(template) == ("mmcl", "ssl")
    assert optim_config.warmup_steps == configs[0].optim.warmup_steps
    np.testing.assert_allclose(hparams["learning_rate"], [1e-5, 3e-5])
    np.testing.assert_allclose(hparams["ssl_weight"], [0.0, 1.0])
    np.testing.assert_allclose(hparams["mmcl_weight"], [1.0, 1.0])

    assert vmap_sweep.non_sweepable_differences(configs) == {}
    configs[1].data.batch_size = 7
    configs[1].cleaning.shrink = 0.5
    assert vmap_sweep.non_sweepable_differences(configs) == {"cleaning.shrink": [1], "data.batch_size": [1]}
    with pytest.raises(ValueError, match="data.batch_size"):
        vmap_sweep.sweep_from_configs(configs)


def test_run_shards_must_divide_devices_and_runs():
    with pytest.raises(ValueError, match="does not divide"):
        vmap_sweep.make_sweep_mesh(3)
    mesh = vmap_sweep.make_sweep_mesh(4)
    vmap_sweep.check_runs_fit_mesh(8, mesh)
    with pytest.raises(ValueError, match="cannot be split evenly"):
        vmap_sweep.check_runs_fit_mesh(6, mesh)
