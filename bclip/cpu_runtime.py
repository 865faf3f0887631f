"""Settings that make training and evaluation steps faster when XLA runs them on CPU hosts: the
compiler options passed to the hot `jit`s, and a glibc heap that keeps step buffers mapped.

Both were measured on the tiny-vit MMCL step (batch 128, fp32, 2 cores; `python -m bclip.bench
step`); neither changes what is computed beyond float rounding, and neither applies on GPU/TPU.
"""

import importlib.metadata
import importlib.util
import os
import platform
import sys
from collections.abc import Sequence
from typing import Any

# YNNPACK takes the matrix products only; layer norms, activations and other elementwise work stay
# with XLA's own fused loops. XLA's default also hands YNNPACK elementwise and reduction fusions,
# for which it first writes broadcast operands (each layer norm's scale and bias) out in full.
# Measured: 5.5 -> 4.6 s per step on 1 core, 2.5 -> 2.3 s on 2.
CPU_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"}

# Forward-only programs (zero-shot evaluation) leave every matrix product to XLA's own Eigen
# kernels. Their products are the narrow forward ones only (no weight gradients, where YNNPACK
# gains); on a 2-core AMD EPYC (AVX2) host the eval image encoder of configs/clean_tiny.py ran
# 355 -> 174 us per image (batch 192), while its train step stayed faster with YNNPACK's products
# (0.098 vs 0.125 s per step).
FORWARD_CPU_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}

# XLA:CPU allocates a step's activations afresh on every call. glibc serves blocks above 32 MiB
# (and, from worker threads' arenas, most blocks) with a fresh mmap and unmaps them on free, so
# every step faults its ~1.7 GB of activations back in page by page: 430,000 minor faults and
# 0.67 s of kernel time per 2.2 s step. One heap that never unmaps or trims reuses the pages:
# 0 faults, 2.0 s per step.
RETAINED_HEAP_TUNABLES = {
    "glibc.malloc.arena_max": "1",
    "glibc.malloc.mmap_max": "0",
    "glibc.malloc.trim_threshold": str(1 << 40),
}
# Set on the re-executed process, so it runs once; set it to 0 to keep the default heap.
RETAINED_HEAP_ENV = "BCLIP_RETAINED_HEAP"

_ACCELERATOR_MODULES = ("libtpu", "jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin", "jax_rocm7_plugin")


def compiler_options(devices: Sequence[Any], forward_only: bool = False) -> dict[str, str] | None:
    """`jax.jit(..., compiler_options=...)` for a program placed on `devices` (e.g. a mesh's
    `devices.flat`): the CPU options (for a forward-only program when `forward_only`) when they
    are all CPU devices, else None."""
    if all(device.platform == "cpu" for device in devices):
        return dict(FORWARD_CPU_COMPILER_OPTIONS if forward_only else CPU_COMPILER_OPTIONS)
    return None


def has_avx512() -> bool:
    """Whether this host's CPU has AVX-512 (read from /proc/cpuinfo; False where that is missing)."""
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and " avx512f" in line for line in f)
    except OSError:
        return False


def host_cpu(cpuinfo: str = "/proc/cpuinfo") -> dict[str, str]:
    """The host CPU's model name and widest vector ISA (from /proc/cpuinfo; empty where missing),
    printed beside CPU benchmark figures, which differ by both."""
    try:
        with open(cpuinfo) as f:
            lines = f.read().splitlines()
    except OSError:
        return {"cpu_model": platform.processor(), "cpu_isa": ""}
    model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "")
    flags = set(next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), []))
    isa = next((name for flag, name in (("avx512f", "AVX-512"), ("avx2", "AVX2"), ("avx", "AVX")) if flag in flags), "")
    return {"cpu_model": model, "cpu_isa": isa}


def accelerator_installed() -> bool:
    """Whether JAX will find a GPU or TPU backend here, judged without starting any backend."""
    if os.environ.get("JAX_PLATFORMS", "").strip().lower() == "cpu":
        return False
    if any(importlib.util.find_spec(name) is not None for name in _ACCELERATOR_MODULES):
        return True
    return bool(importlib.metadata.entry_points(group="jax_plugins"))


def tunables_with_retained_heap(existing: str) -> str:
    """GLIBC_TUNABLES with the retained-heap settings added; a key the user set keeps their value."""
    entries = [entry for entry in existing.split(":") if entry]
    user_keys = {entry.split("=", 1)[0] for entry in entries}
    entries += [f"{key}={value}" for key, value in RETAINED_HEAP_TUNABLES.items() if key not in user_keys]
    return ":".join(entries)


def reexec_with_retained_heap() -> None:
    """Restart this command (same interpreter, options and arguments) with RETAINED_HEAP_TUNABLES
    in GLIBC_TUNABLES, which glibc reads only at process start. Call it first thing in a
    command-line entry point, before any work; it returns without doing anything on non-glibc
    systems, where a GPU or TPU backend is installed, when already done, or when
    BCLIP_RETAINED_HEAP=0."""
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return
    if os.environ.get(RETAINED_HEAP_ENV) is not None or accelerator_installed():
        return
    os.environ["GLIBC_TUNABLES"] = tunables_with_retained_heap(os.environ.get("GLIBC_TUNABLES", ""))
    os.environ[RETAINED_HEAP_ENV] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])
