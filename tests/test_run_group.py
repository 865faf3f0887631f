"""Groups of runs (bclip.run_group): each vmapped run equals its own lone run; the other run loops
give what vmap gives, and "dispatch" exactly what groups of one give; hyper-parameters, replicated
and taken states, meshes."""

import jax
import numpy as np
import optax
import pytest

from bclip import config as run_configs
from bclip import objectives, optim, run_group, sharding, train_step
from bclip.models import clip

TOTAL_STEPS = 8
WARMUP_STEPS = 2
NUM_STEPS = 4  # two warm-up updates (the first at lr 0), then the cosine part
BATCH_SIZE = 16
# Three cleaning runs: MMCL-only, CleanCLIP, CleanCLIP with a heavier SSL term and strong decay.
LEARNING_RATES = [1e-3, 3e-3, 5e-4]
SSL_WEIGHTS = [0.0, 1.0, 2.0]
WEIGHT_DECAYS = [0.0, 0.1, 1.0]
NUM_RUNS = len(LEARNING_RATES)


def _optim_config(**overrides):
    # Some gradients are exactly zero in exact arithmetic (e.g. the attention key bias, which softmax
    # ignores); with Adam's eps of 1e-8, round-off in them (whose value depends on how XLA orders a
    # reduction, which differs between the vmapped and the single-run program) becomes a full ±lr
    # step. eps=1e-3 turns round-off of ~1e-9 into nothing while real gradients still move the
    # parameters by a good part of a step.
    return optim.optim_config(warmup_steps=WARMUP_STEPS, eps=1e-3, **overrides)


def _run_optim_and_objective(run):
    """Run `run`'s own optim and objective sections, as its config would hold them."""
    optim_config = _optim_config(learning_rate=LEARNING_RATES[run], weight_decay=WEIGHT_DECAYS[run])
    return optim_config, objectives.objective_config(mmcl=1.0, ssl=SSL_WEIGHTS[run])


def _run_configs():
    """The three runs' configs: equal but for their learning rate, weight decay and SSL weight."""
    configs = []
    for run in range(NUM_RUNS):
        config = run_configs.run_config("micro-vit")
        config.optim, config.objective = _run_optim_and_objective(run)
        configs.append(config)
    return configs


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

    images = lambda: rng.integers(0, 256, (BATCH_SIZE, size, size, 3), dtype=np.uint8)  # noqa: E731
    return {"image": images(), "text": tokens(), "aug_image": images(), "aug_text": tokens()}


def _assert_trees_close(a, b, rtol, atol, what=""):
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(x, y, rtol=rtol, atol=atol, err_msg=what + jax.tree_util.keystr(path))


def _assert_trees_equal(a, b, what=""):
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y, err_msg=what + jax.tree_util.keystr(path))


@pytest.fixture(scope="module")
def sweep():
    """micro-vit on the 8-device data mesh, a 'pretrained' start, the group's one-run step and the
    runs' hyper-parameters."""
    configs = _run_configs()
    model_config = configs[0].model
    model = clip.build_model(model_config)
    mesh = sharding.make_mesh()
    variables = jax.device_get(
        train_step.init_variables(model, jax.random.key(0), model_config.image.size, model_config.text.context_length)
    )
    template = run_group.group_objective(configs)
    optim_config = configs[0].optim  # the runs share all but their scalars
    tx = optim.make_optimizer(optim_config)
    run_step = train_step.make_train_step(model, tx, template, optim_config, TOTAL_STEPS)
    run_state = jax.device_get(train_step.init_state(tx, variables))
    run_shardings = jax.tree.map(lambda _: sharding.replicated(mesh), run_state)
    batches = [jax.device_put(_batch(model_config, seed), sharding.batch_sharding(mesh)) for seed in range(NUM_STEPS)]
    hparams = run_group.group_hyperparams(configs)

    def start(group, shardings=run_shardings):
        """The group's states, every run starting from the 'pretrained' variables (a fresh copy:
        the step donates them)."""
        return group.replicate(jax.device_put(run_state, shardings), shardings)

    return dict(model=model, model_config=model_config, mesh=mesh, variables=variables, template=template,
                optim_config=optim_config, tx=tx, run_step=run_step, run_state=run_state,
                run_shardings=run_shardings, start=start, batches=batches, hparams=hparams)


def _train_group(sweep, group, hparams=None):
    """`group`'s runs trained on the fixture's batches: final params and per-step metrics {key: [N]}."""
    hparams = sweep["hparams"] if hparams is None else hparams
    step = group.jit_step(sweep["run_step"], sweep["run_shardings"])
    states = sweep["start"](group)
    on_mesh = group.hyperparams(hparams)
    history = []
    for i, batch in enumerate(sweep["batches"]):
        states, metrics = step(states, batch, jax.random.key(i), on_mesh)
        history.append(jax.device_get(metrics))
    return jax.device_get(states["params"]), history


def _lone_run(sweep, run):
    """Run `run` alone: `train_step.make_train_step` with its own objective, jitted by
    `shard_and_jit_train_step`, stepped with its own hyper-parameters."""
    optim_config, objective = _run_optim_and_objective(run)
    tx = optim.make_optimizer(optim_config)
    mesh = sweep["mesh"]
    state = train_step.init_state(tx, sweep["variables"])
    shardings = jax.tree.map(lambda _: sharding.replicated(mesh), state)
    state = jax.device_put(state, shardings)
    step = train_step.shard_and_jit_train_step(
        train_step.make_train_step(sweep["model"], tx, objective, optim_config, TOTAL_STEPS), shardings, mesh
    )
    hparams = train_step.run_hyperparams(optim_config, objective)
    history = []
    for i, batch in enumerate(sweep["batches"]):
        state, metrics = step(state, batch, jax.random.key(i), hparams)
        history.append(jax.device_get(metrics))
    return jax.device_get(state["params"]), history


def test_replicate_and_take(sweep):
    # The first test to use the `sweep` fixture, so it carries its set-up (initialising the model).
    run_state, run_shardings, mesh = sweep["run_state"], sweep["run_shardings"], sweep["mesh"]
    group = run_group.RunGroup(NUM_RUNS, mesh, "vmap")
    states = sweep["start"](group)
    assert all(leaf.shape[0] == NUM_RUNS for leaf in jax.tree.leaves(states))
    for run in (0, 2):
        taken = group.take(states, run, run_shardings)
        _assert_trees_equal(jax.device_get(taken), run_state, what=f"run {run}: ")
        assert jax.tree.leaves(taken)[0].sharding == jax.tree.leaves(run_shardings)[0]
    # Stacked leaves keep each run's layout behind the run axis (whole on every device here).
    kernel = jax.tree.leaves(states["params"])[0]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec(None)
    abstract = group.abstract(jax.eval_shape(lambda: run_state), run_shardings)
    assert jax.tree.map(lambda a: a.shape, abstract) == jax.tree.map(lambda x: x.shape, jax.device_get(states))

    # A group of one keeps its run's state as it is.
    lone = run_group.RunGroup(1, mesh, "vmap")
    assert lone.run_loop == "single" and not lone.stacked
    one = jax.device_put(run_state, run_shardings)
    assert lone.replicate(one, run_shardings) is one
    assert lone.take(one, 0, run_shardings) is one
    assert lone.shardings(run_shardings) is run_shardings


@pytest.fixture(scope="module")
def vectorised(sweep):
    """The three runs trained together (vmap): final params [N, ...] and per-step metrics {key: [N]}."""
    return _train_group(sweep, run_group.RunGroup(NUM_RUNS, sweep["mesh"], "vmap"))


def test_each_run_weighs_the_loss_terms_with_its_own_weights(vectorised):
    # The first test to use the `vectorised` fixture, so it carries its set-up (the vectorised compile).
    _, history = vectorised
    first = history[0]
    assert first["loss"].shape == (NUM_RUNS,)
    np.testing.assert_allclose(first["loss"], first["mmcl"] + np.asarray(SSL_WEIGHTS) * first["ssl"], rtol=1e-6)
    # Same start, same batch: the unweighted terms agree across runs at the first step.
    np.testing.assert_allclose(first["mmcl"], first["mmcl"][0], rtol=1e-6)
    np.testing.assert_allclose(first["ssl"], first["ssl"][0], rtol=1e-6)
    assert first["params_finite"].tolist() == [True] * NUM_RUNS


# One test per run: each compiles its own single-run step, as a sequential sweep would.
@pytest.mark.parametrize("run", range(NUM_RUNS))
def test_each_vectorised_run_matches_its_lone_run(sweep, vectorised, run):
    params, history = vectorised
    lone_params, lone_history = _lone_run(sweep, run)
    for t, (together, alone) in enumerate(zip(history, lone_history, strict=True)):
        what = f"run {run} step {t}: "
        for key in ("loss", "mmcl", "temperature"):
            np.testing.assert_allclose(together[key][run], alone[key], rtol=2e-5, err_msg=what + key)
        if SSL_WEIGHTS[run]:
            np.testing.assert_allclose(together["ssl"][run], alone["ssl"], rtol=2e-5, err_msg=what + "ssl")
        else:
            assert "ssl" not in alone  # the lone MMCL-only run computes no SSL term
        np.testing.assert_allclose(together["grad_norm"][run], alone["grad_norm"], rtol=1e-4, err_msg=what)
        # The same warm-up + cosine shape, scaled by each run's own peak.
        np.testing.assert_allclose(together["learning_rate"][run], alone["learning_rate"], rtol=1e-6, atol=1e-12, err_msg=what)
    _assert_trees_close(jax.tree.map(lambda x: x[run], params), lone_params, rtol=1e-4, atol=2e-6, what=f"run {run}: ")


def test_runs_differ_by_far_more_than_the_tolerance(vectorised):
    params, history = vectorised
    np.testing.assert_array_equal(history[0]["learning_rate"], 0.0)  # warm-up starts at 0
    np.testing.assert_allclose(history[1]["learning_rate"], np.asarray(LEARNING_RATES) / 2, rtol=1e-6)
    for other in (1, 2):
        delta = max(np.max(np.abs(leaf[0] - leaf[other])) for leaf in jax.tree.leaves(params))
        assert delta > 1e-3, (other, delta)


# "map" runs the same one-run step in a loop inside the program, as "dispatch" does outside it.
@pytest.mark.parametrize("run_loop", ["vmap", "dispatch"])
def test_temperature_clamp_applies_per_run(sweep, run_loop):
    group = run_group.RunGroup(NUM_RUNS, sweep["mesh"], run_loop)
    states = sweep["start"](group)
    # Run 0 starts inside [0, log 100], run 1 above it and run 2 below it.
    logit_scale = np.array([np.log(1 / 0.07), np.log(100.0) + 0.5, -0.5], np.float32)
    scale_sharding = states["params"]["logit_scale"].sharding
    states["params"] = {**states["params"], "logit_scale": jax.device_put(logit_scale, scale_sharding)}
    step = group.jit_step(sweep["run_step"], sweep["run_shardings"])
    states, metrics = step(states, sweep["batches"][0], jax.random.key(0), group.hyperparams(sweep["hparams"]))
    # The first update is at lr 0, so only the clamp moves a scale: each run lands exactly on its own
    # bound (log 100 above, 0 below), or keeps its start.
    np.testing.assert_array_equal(np.asarray(metrics["learning_rate"]), 0.0)
    expected = np.array([np.log(1 / 0.07), np.log(100.0), 0.0], np.float32)
    np.testing.assert_array_equal(np.asarray(states["params"]["logit_scale"]), expected)
    assert np.asarray(states["params"]["logit_scale"])[1] == np.float32(train_step.LOGIT_SCALE_MAX)
    np.testing.assert_allclose(metrics["temperature"], np.exp(expected.astype(np.float64)), rtol=1e-6)


def test_runs_split_over_a_second_mesh_axis_match_replicated_runs(sweep, vectorised):
    """Two runs on a (runs: 2, data: 4) mesh give what the same runs gave on the 1-D data mesh."""
    num_runs = 2
    hparams = {k: v[:num_runs] for k, v in sweep["hparams"].items()}
    mesh = run_group.make_mesh(run_shards=2)
    assert dict(mesh.shape) == {run_group.RUN_AXIS: 2, sharding.DATA_AXIS: 4}
    group = run_group.RunGroup(num_runs, mesh, "vmap")
    run_shardings = jax.tree.map(lambda _: sharding.replicated(mesh), sweep["run_state"])
    states = sweep["start"](group, run_shardings)
    step = group.jit_step(sweep["run_step"], run_shardings)
    on_mesh = group.hyperparams(hparams)
    history = []
    for i, batch in enumerate(sweep["batches"]):
        batch = jax.device_put(jax.device_get(batch), sharding.batch_sharding(mesh))
        states, metrics = step(states, batch, jax.random.key(i), on_mesh)
        history.append(jax.device_get(metrics))
    kernel = jax.tree.leaves(states["params"])[0]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec(run_group.RUN_AXIS)
    assert kernel.addressable_shards[0].data.shape[0] == 1  # each device holds one run's copy

    replicated_params, replicated_history = vectorised
    for split, replicated in zip(history, replicated_history, strict=True):
        np.testing.assert_allclose(split["loss"], replicated["loss"][:num_runs], rtol=2e-5)
    _assert_trees_close(jax.device_get(states["params"]), jax.tree.map(lambda x: x[:num_runs], replicated_params), rtol=1e-4, atol=2e-6)
    with pytest.raises(ValueError, match='run_loop "dispatch" .* run_shards=1'):
        run_group.RunGroup(num_runs, mesh, "dispatch")


@pytest.fixture(scope="module")
def dispatched(sweep):
    """The three runs stepped one at a time by one compiled one-run program ("dispatch")."""
    return _train_group(sweep, run_group.RunGroup(NUM_RUNS, sweep["mesh"], "dispatch"))


@pytest.mark.parametrize("run_loop", ["map", "dispatch"])
def test_other_run_loops_give_what_vmap_gives(sweep, vectorised, dispatched, run_loop):
    """The runs looped over inside the program (lax.map), or stepped one at a time by one compiled
    single-run program, train as the vmapped runs do."""
    if run_loop == "dispatch":
        params, history = dispatched
    else:
        params, history = _train_group(sweep, run_group.RunGroup(NUM_RUNS, sweep["mesh"], run_loop))
    vmapped_params, vmapped_history = vectorised
    for looped, vmapped in zip(history, vmapped_history, strict=True):
        assert looped.keys() == vmapped.keys()
        for key in looped:
            np.testing.assert_allclose(looped[key], vmapped[key], rtol=2e-5, atol=1e-12, err_msg=key)
    _assert_trees_close(params, vmapped_params, rtol=1e-4, atol=2e-6)
    with pytest.raises(ValueError, match="run_loop must be one of"):
        run_group.RunGroup(NUM_RUNS, sweep["mesh"], "scan")


def test_dispatched_runs_are_bit_identical_to_groups_of_one(sweep, dispatched):
    """"dispatch" runs each run's step at single-run size, the arithmetic a group of one (a lone
    run of the trainer) does: every run's metrics and parameters are the same to the last bit.

    That holds with the tests' XLA flags (conftest.py: backend optimisation level 0, no fusion
    emitters). With XLA:CPU's defaults the two programs are still the same arithmetic op for op, but
    the dispatch program reads its run's slice of the stacked state inside the fusions (a fused
    dynamic-slice), and the code generated for the fusions that sum the first image layer's
    gradients over the batch rounds differently: measured, 3 of 62 gradient leaves (positional and
    class embedding, patch kernel) differ in the last bits at the first step, the parameters by
    up to 1e-6 after four steps.
    """
    params, history = dispatched
    for run in range(NUM_RUNS):
        lone = run_group.RunGroup(1, sweep["mesh"])
        assert lone.run_loop == "single"
        lone_params, lone_history = _train_group(sweep, lone, {k: v[run : run + 1] for k, v in sweep["hparams"].items()})
        for t, (together, alone) in enumerate(zip(history, lone_history, strict=True)):
            assert together.keys() == alone.keys()
            for key in together:
                assert alone[key].shape == (1,), key
                np.testing.assert_array_equal(together[key][run], alone[key][0], err_msg=f"run {run} step {t}: {key}")
        _assert_trees_equal(jax.tree.map(lambda x: x[run], params), lone_params, what=f"run {run}: ")


def test_schedule_of_a_traced_peak_is_the_runs_warmup_cosine_schedule():
    """The step computes each run's learning rate from its peak, a traced hyper-parameter: the same
    warm-up and cosine decay optax gives for that peak as a constant."""
    config = optim.optim_config(warmup_steps=5)
    schedule = jax.jit(lambda peak, t: optim.learning_rate_schedule(config, 40, peak=peak)(t))
    for peak in (1e-5, 3e-4, 2e-2):
        expected = optax.warmup_cosine_decay_schedule(0.0, peak, warmup_steps=5, decay_steps=40)
        for t in (0, 1, 4, 5, 6, 20, 39, 40):
            np.testing.assert_allclose(schedule(np.float32(peak), t), expected(t), rtol=1e-6, atol=1e-12)
        np.testing.assert_allclose(
            optim.learning_rate_schedule(optim.optim_config(warmup_steps=5, learning_rate=peak), 40)(20), expected(20), rtol=1e-6
        )


def test_group_hyperparams_stack_each_runs_values():
    configs = _run_configs()
    hparams = run_group.group_hyperparams(configs)
    assert set(hparams) == {
        "learning_rate", "weight_decay", "mmcl_weight", "safe_mmcl_weight", "risky_ssl_weight", "ssl_weight",
        "siglip_weight", "cluster_weight", "par_weight",
    }
    assert {f"{'optim' if key in optim.HYPERPARAMS else 'objective'}.{key}" for key in hparams} == set(run_group.SWEEPABLE_KEYS)
    np.testing.assert_allclose(hparams["learning_rate"], LEARNING_RATES)
    np.testing.assert_allclose(hparams["weight_decay"], WEIGHT_DECAYS)
    np.testing.assert_allclose(hparams["ssl_weight"], SSL_WEIGHTS)
    np.testing.assert_allclose(hparams["mmcl_weight"], [1.0] * NUM_RUNS)
    np.testing.assert_allclose(hparams["siglip_weight"], [0.0] * NUM_RUNS)
    assert all(v.dtype == np.float32 and v.shape == (NUM_RUNS,) for v in hparams.values())
    # Each run's values are those a lone run of its config steps with.
    for run, config in enumerate(configs):
        lone = train_step.run_hyperparams(config.optim, config.objective)
        assert {k: v[run] for k, v in hparams.items()} == lone


def test_group_objective_computes_every_term_any_run_weighs():
    configs = _run_configs()
    template = run_group.group_objective(configs)
    assert objectives.active_terms(template) == ("mmcl", "ssl")
    # The template only chooses the terms: each is on with weight 1; the runs' weights are hparams.
    assert template.ssl_weight == 1.0 and template.mmcl_weight == 1.0
    configs[2].objective.siglip_weight = 0.5
    assert objectives.active_terms(run_group.group_objective(configs)) == ("mmcl", "ssl", "siglip")
    configs[0].objective.ssl_weight = configs[1].objective.ssl_weight = configs[2].objective.ssl_weight = 0.0
    assert "ssl" not in objectives.active_terms(run_group.group_objective(configs))


def test_only_sweepable_keys_may_differ():
    configs = _run_configs()[:2]
    names = ["a", "b"]
    assert run_group.non_sweepable_differences(configs) == {}
    assert run_group.vectorisation_problems(configs, names) == []
    run_group.check_vectorisable(configs, names)
    configs[1].data.batch_size = 7
    configs[1].cleaning.shrink = 0.5
    assert run_group.non_sweepable_differences(configs) == {"cleaning.shrink": [1], "data.batch_size": [1]}
    with pytest.raises(run_group.NotVectorisableError, match=r"data.batch_size differs between runs \(a: .*, b: 7\)"):
        run_group.check_vectorisable(configs, names)
    assert issubclass(run_group.NotVectorisableError, ValueError)
    # A lone run is always a group (of one).
    assert run_group.vectorisation_problems(configs[1:], names[1:]) == []
    with pytest.raises(run_group.NotVectorisableError, match="no runs"):
        run_group.check_vectorisable([], [])


def test_run_shards_must_divide_devices_and_runs():
    with pytest.raises(ValueError, match="does not divide"):
        run_group.make_mesh(3)
    mesh = run_group.make_mesh(4)
    run_group.RunGroup(8, mesh, "vmap")
    with pytest.raises(ValueError, match="cannot be split evenly"):
        run_group.RunGroup(6, mesh, "vmap")
    with pytest.raises(ValueError, match="at least one run"):
        run_group.RunGroup(0, mesh)
    assert run_group.run_sharding(mesh).spec == jax.sharding.PartitionSpec(run_group.RUN_AXIS)
    assert run_group.run_sharding(sharding.make_mesh()).spec == jax.sharding.PartitionSpec()
