"""CPU-host settings: compiler options for the hot jits and the retained-heap restart."""

import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

from bclip import config as run_configs
from bclip import cpu_runtime, evaluators, sharding, train_step
from bclip.data import training_input
from bclip.data.synthetic import writer
from bclip.models import clip, vit


def test_compiler_options_only_for_cpu_devices():
    class FakeGpu:
        platform = "gpu"

    assert cpu_runtime.compiler_options(jax.devices()) == cpu_runtime.CPU_COMPILER_OPTIONS
    assert cpu_runtime.compiler_options(jax.devices(), forward_only=True) == cpu_runtime.FORWARD_CPU_COMPILER_OPTIONS
    assert cpu_runtime.compiler_options([jax.devices()[0], FakeGpu()]) is None
    assert cpu_runtime.compiler_options([jax.devices()[0], FakeGpu()], forward_only=True) is None


def _block_and_grad():
    block = vit.ResidualAttentionBlock(heads=2, num_layers=2)
    x = jax.random.normal(jax.random.key(0), (8, 9, 32))
    params = jax.jit(block.init)(jax.random.key(1), x)  # op by op, each of its ops would compile alone
    return params, x, jax.grad(lambda params, x: jnp.sum(block.apply(params, x) ** 2))


def _non_dot_library_fusions(compiled_text: str) -> list[str]:
    """Names of the YNNPACK fusions in compiled HLO text whose body computes no matrix product."""
    bodies = {}
    for match in re.finditer(r"^%(\S+) \([^\n]*\{\n(.*?)^\}", compiled_text, re.S | re.M):
        bodies[match.group(1)] = match.group(2)
    calls = re.findall(r"%(\S+) = .* fusion\(.*calls=%([\w.\-]+).*__ynn_fusion", compiled_text)
    assert calls, "no YNNPACK fusion at all"
    return [name for name, body in calls if " dot(" not in bodies[body]]


def test_compiler_options_compile_and_keep_results():
    """A pre-norm transformer block's gradient compiled with and without the CPU options: the
    numbers agree to float rounding, and with them YNNPACK gets matrix products only (XLA's
    default also hands it a layer-norm reduction here)."""
    params, x, grad = _block_and_grad()
    plain = jax.jit(grad)(params, x)
    tuned_fn = jax.jit(grad, compiler_options=cpu_runtime.compiler_options(jax.devices()))
    tuned = tuned_fn(params, x)
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(tuned)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    assert _non_dot_library_fusions(tuned_fn.lower(params, x).compile().as_text()) == []


def test_forward_options_keep_matrix_products_with_xla_and_results_unchanged():
    block = vit.ResidualAttentionBlock(heads=2, num_layers=2)
    x = jax.random.normal(jax.random.key(0), (8, 9, 32))
    params = jax.jit(block.init)(jax.random.key(1), x)
    forward = jax.jit(block.apply, compiler_options=cpu_runtime.compiler_options(jax.devices(), forward_only=True))
    np.testing.assert_allclose(forward(params, x), jax.jit(block.apply)(params, x), rtol=1e-5, atol=1e-5)
    text = forward.lower(params, x).compile().as_text()
    assert " dot(" in text and "__ynn_fusion" not in text
    # XLA's default on this jaxlib does hand these products to YNNPACK: the option is what removes them.
    assert "__ynn_fusion" in jax.jit(block.apply).lower(params, x).compile().as_text()


def test_evaluator_jits_use_the_forward_options(tmp_path):
    world = writer.write_world(tmp_path / "world", image_size=32, num_train=8, num_test=16, num_selection=0)
    config = run_configs.run_config("micro-vit", text={"vocab_size": 256, "context_length": 24})
    config.data.tokenizer.path = os.path.join(world, writer.VOCAB_FILE)
    with config.unlocked():
        config.eval.sets = {"test": run_configs.eval_set_config("folder", os.path.join(world, "test"))}
    model = clip.build_model(config.model)
    tokenizer = training_input.make_tokenizer(config)
    evaluator = evaluators.make_evaluators(config, model, tokenizer, sharding.make_mesh(), 0, 1)["test"]
    variables = train_step.init_variables(model, jax.random.key(0), 32, config.model.text.context_length)
    tokens = np.zeros((4, config.model.text.context_length), np.int32)
    assert "__ynn_fusion" not in evaluator.encode_text.lower(variables, tokens).compile().as_text()


def test_jitted_train_step_carries_the_options():
    params, x, grad = _block_and_grad()
    mesh = sharding.make_mesh()
    jitted = train_step.shard_and_jit_train_step(
        lambda state, batch, rng, hparams: (state, grad(state, batch)), sharding.replicated(mesh), mesh
    )
    text = jitted.lower(params, x, jax.random.key(0), {}).compile().as_text()
    assert _non_dot_library_fusions(text) == []


def test_tunables_keep_the_users_values():
    assert cpu_runtime.tunables_with_retained_heap("") == (
        "glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=1099511627776"
    )
    merged = cpu_runtime.tunables_with_retained_heap("glibc.malloc.arena_max=4:glibc.cpu.x86_rep_movsb_threshold=1")
    assert merged.split(":") == [
        "glibc.malloc.arena_max=4",
        "glibc.cpu.x86_rep_movsb_threshold=1",
        "glibc.malloc.mmap_max=0",
        "glibc.malloc.trim_threshold=1099511627776",
    ]


_PROBE = (
    "import os, sys; from bclip import cpu_runtime; print('start', flush=True); "
    "cpu_runtime.reexec_with_retained_heap(); "
    "print(os.environ.get('GLIBC_TUNABLES'), os.environ.get('BCLIP_RETAINED_HEAP'), sys.argv[1:])"
)


def _probe(**env_changes):
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "BCLIP_RETAINED_HEAP")}
    env.update(env_changes)
    done = subprocess.run([sys.executable, "-c", _PROBE, "--flag", "x y"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def test_reexec_restarts_once_with_the_tunables_and_the_same_arguments():
    if not sys.platform.startswith("linux"):
        assert _probe(JAX_PLATFORMS="cpu") == ["start", "None None ['--flag', 'x y']"]
        return
    lines = _probe(JAX_PLATFORMS="cpu", GLIBC_TUNABLES="glibc.malloc.arena_max=2")
    # Printed once before the restart and once after; the restarted process does not restart again.
    assert lines[:2] == ["start", "start"]
    tunables, marker, args = lines[2].split(" ", 2)
    assert tunables.split(":")[0] == "glibc.malloc.arena_max=2"
    assert "glibc.malloc.mmap_max=0" in tunables.split(":")
    assert marker == "1" and args == "['--flag', 'x y']"


def test_reexec_can_be_turned_off():
    assert _probe(JAX_PLATFORMS="cpu", BCLIP_RETAINED_HEAP="0") == ["start", "None 0 ['--flag', 'x y']"]


def test_host_cpu_names_the_model_and_the_widest_vector_isa(tmp_path):
    def cpuinfo(flags):
        path = tmp_path / f"cpuinfo_{len(flags)}"
        path.write_text(f"processor\t: 0\nmodel name\t: AMD EPYC 7B13\nflags\t\t: fpu sse2 {flags} rdrand\n\nprocessor\t: 1\n")
        return str(path)

    assert cpu_runtime.host_cpu(cpuinfo("avx avx2 fma")) == {"cpu_model": "AMD EPYC 7B13", "cpu_isa": "AVX2"}
    assert cpu_runtime.host_cpu(cpuinfo("avx avx2 avx512f avx512bw"))["cpu_isa"] == "AVX-512"
    assert cpu_runtime.host_cpu(cpuinfo("sse4_2"))["cpu_isa"] == ""
    assert cpu_runtime.host_cpu(str(tmp_path / "missing"))["cpu_isa"] == ""
