"""Test setup: 8 simulated CPU devices, set before jax is imported anywhere."""

import atexit
import os
import shutil
import tempfile

# Unoptimised XLA backend code: the tests' tiny steps run about as fast, and compile in half the time.
# Without the newer fusion emitters the compile halves again (micro-vit SSL step: 7.2 -> 4.1 s;
# micro-resnet: 13.0 -> 6.7 s); test processes started by tests inherit these flags.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
    + " --xla_cpu_use_fusion_emitters=false"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
# Many tests build the same tiny programs; a compilation cache for the session compiles each once.
# The first pytest process makes it and the test processes it starts (pytest-xdist) share it, so a
# program one of them compiled is a cache hit for the other; a size bound makes JAX lock the cache
# while reading and writing it (the lock needs filelock).
_CACHE_ENV = "BCLIP_TEST_JAX_CACHE"
_CACHE_DIR = os.environ.get(_CACHE_ENV)
if _CACHE_DIR is None:
    _CACHE_DIR = os.environ[_CACHE_ENV] = tempfile.mkdtemp(prefix="bclip-jax-cache-")
    atexit.register(shutil.rmtree, _CACHE_DIR, ignore_errors=True)
jax.config.update("jax_compilation_cache_dir", _CACHE_DIR)
jax.config.update("jax_compilation_cache_max_size", 8 << 30)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: end-to-end test that takes more than a few seconds")


# The slowest files, slowest first: with `--dist loadfile` each file goes to one test process in
# collection order, so starting these first keeps both processes busy until the end.
_SLOW_FILES_FIRST = (
    "test_multiprocess.py",
    "test_study_claim.py",
    "test_extending_docs.py",
    "test_train.py",
    "test_sweep_vectorised.py",
    "test_experiment.py",
    "test_train_step.py",
    "test_epath_workdir.py",
    "test_run_group.py",
    # Then the middling ones, so that the last files to start are the seconds-long ones.
    "test_models.py",
    "test_open_clip_weights.py",
    "test_pipeline.py",
    "test_cleaning.py",
    "test_main.py",
    "test_train_fake_data.py",
    "test_webdataset.py",
    "test_detection.py",
    "test_device_augment.py",
    "test_evaluation.py",
    "test_epoch_passes.py",
    "test_cpu_runtime.py",
)


def pytest_collection_modifyitems(config, items):
    rank = {name: position for position, name in enumerate(_SLOW_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


# XLA's own defaults for the two options the flags above turn down, as per-program options (they
# take precedence over XLA_FLAGS for the programs bclip compiles with cpu_runtime's options).
_OPTIMISED = {"xla_backend_optimization_level": 3, "xla_cpu_use_fusion_emitters": True}


@pytest.fixture(scope="module")
def optimised_cpu_programs():
    """bclip's train steps and eval encoders compiled with XLA's optimisations, for a module whose
    runs take hundreds of steps: there a step's run time outweighs its compile time (the claim
    study's micro-vit MMCL step: about 2.3x the pairs/s of the unoptimised one)."""
    from bclip import cpu_runtime

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cpu_runtime, "CPU_COMPILER_OPTIONS", {**cpu_runtime.CPU_COMPILER_OPTIONS, **_OPTIMISED})
        patch.setattr(cpu_runtime, "FORWARD_CPU_COMPILER_OPTIONS", {**cpu_runtime.FORWARD_CPU_COMPILER_OPTIONS, **_OPTIMISED})
        yield
