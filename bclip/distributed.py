"""Multi-process start-up: decides how (and whether) to call `jax.distributed.initialize`.

The decision is a pure function of the environment (`plan_initialization`), so each backend's
rule is tested without starting anything; `initialize` applies it once at the top of a run.

Where the settings come from, per backend:
  - TPU pod: nothing to pass, JAX reads the topology from the TPU runtime.
  - Multi-node GPU under SLURM: the coordinator is the first node of the step's nodelist, the
    process count and id are SLURM's task count and rank, and with one process per GPU each
    process keeps only GPU number SLURM_LOCALID.
  - Anything else with several processes (CPU tests, hand-launched GPU jobs): the explicit
    variables BCLIP_COORDINATOR_ADDRESS, BCLIP_NUM_PROCESSES, BCLIP_PROCESS_ID and optionally
    BCLIP_LOCAL_DEVICE_IDS ("0,1"). Explicit variables also win over SLURM's, one by one.
  - A single process: nothing.
BCLIP_BACKEND (tpu | gpu | cpu) names the backend when detection should not guess.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from typing import Any

BACKENDS = ("tpu", "gpu", "cpu")

COORDINATOR_ADDRESS = "BCLIP_COORDINATOR_ADDRESS"
COORDINATOR_PORT = "BCLIP_COORDINATOR_PORT"
NUM_PROCESSES = "BCLIP_NUM_PROCESSES"
PROCESS_ID = "BCLIP_PROCESS_ID"
LOCAL_DEVICE_IDS = "BCLIP_LOCAL_DEVICE_IDS"
BACKEND = "BCLIP_BACKEND"

# Set by Cloud TPU runtimes (GKE, queued resources); on a bare TPU VM the /dev/accel* check applies.
_TPU_ENV_MARKERS = ("TPU_WORKER_HOSTNAMES", "TPU_ACCELERATOR_TYPE", "TPU_WORKER_ID", "CLOUD_TPU_TASK_ID")
_JAX_PLATFORM_TO_BACKEND = {"tpu": "tpu", "cuda": "gpu", "rocm": "gpu", "gpu": "gpu", "cpu": "cpu"}


# ---------------------------------------------------------------------------------------------
# SLURM strings
# ---------------------------------------------------------------------------------------------


def _split_top_level(text: str) -> list[str]:
    """Splits on commas that are not inside [...]."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(text):
        if char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ']' in SLURM nodelist {text!r}")
        elif char == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth != 0:
        raise ValueError(f"unbalanced '[' in SLURM nodelist {text!r}")
    parts.append(text[start:])
    return [part for part in parts if part]


def _expand_range(item: str, nodelist: str) -> list[str]:
    """"07" -> ["07"]; "08-10" -> ["08", "09", "10"] (zero padding kept from the start)."""
    match = re.fullmatch(r"(\d+)(?:-(\d+))?", item.strip())
    if not match:
        raise ValueError(f"bad range {item!r} in SLURM nodelist {nodelist!r}")
    first, last = match.group(1), match.group(2)
    if last is None:
        return [first]
    if int(last) < int(first):
        raise ValueError(f"descending range {item!r} in SLURM nodelist {nodelist!r}")
    width = len(first) if first.startswith("0") else 0
    return [str(number).zfill(width) for number in range(int(first), int(last) + 1)]


def _expand_host_pattern(pattern: str, nodelist: str) -> list[str]:
    """One host pattern, possibly with several bracket groups: "n[1-2]-ib[3,5]" -> 4 names."""
    open_at = pattern.find("[")
    if open_at < 0:
        return [pattern]
    close_at = pattern.index("]", open_at)
    prefix, ranges, rest = pattern[:open_at], pattern[open_at + 1 : close_at], pattern[close_at + 1 :]
    suffixes = _expand_host_pattern(rest, nodelist)
    hosts = []
    for item in ranges.split(","):
        for number in _expand_range(item, nodelist):
            hosts.extend(prefix + number + suffix for suffix in suffixes)
    return hosts


def expand_nodelist(nodelist: str) -> list[str]:
    """Expands a SLURM hostlist, e.g. "node[01-03,07],gpu5" -> node01 node02 node03 node07 gpu5.

    The same thing `scontrol show hostnames` does, for where scontrol is not on the PATH.
    """
    hosts = []
    for pattern in _split_top_level(nodelist.strip()):
        hosts.extend(_expand_host_pattern(pattern, nodelist))
    return hosts


def expand_tasks_per_node(tasks_per_node: str) -> list[int]:
    """SLURM_TASKS_PER_NODE, e.g. "4(x2),3" -> [4, 4, 3] (one entry per node)."""
    counts = []
    for item in tasks_per_node.split(","):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", item.strip())
        if not match:
            raise ValueError(f"bad SLURM_TASKS_PER_NODE {tasks_per_node!r}")
        counts.extend([int(match.group(1))] * int(match.group(2) or 1))
    return counts


# ---------------------------------------------------------------------------------------------
# The decision
# ---------------------------------------------------------------------------------------------


def detect_backend(env: Mapping[str, str], path_exists: Callable[[str], bool] = os.path.exists) -> str:
    """"tpu", "gpu" or "cpu", without initialising any JAX backend (that must wait for
    `jax.distributed.initialize`). BCLIP_BACKEND, then JAX_PLATFORMS, then the machine."""
    if env.get(BACKEND):
        backend = env[BACKEND].strip().lower()
        if backend not in BACKENDS:
            raise ValueError(f"{BACKEND}={env[BACKEND]!r}: expected one of {BACKENDS}")
        return backend
    platforms = env.get("JAX_PLATFORMS", "").strip().lower()
    if platforms:
        first = platforms.split(",")[0].strip()
        if first in _JAX_PLATFORM_TO_BACKEND:
            return _JAX_PLATFORM_TO_BACKEND[first]
    if any(marker in env for marker in _TPU_ENV_MARKERS) or path_exists("/dev/accel0"):
        return "tpu"
    if path_exists("/dev/nvidia0") or path_exists("/proc/driver/nvidia/version"):
        return "gpu"
    return "cpu"


def _int_variable(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise ValueError(f"{name}={env[name]!r} is not an integer") from None


def _slurm_step(env: Mapping[str, str]) -> dict[str, Any] | None:
    """Task count, rank, node list, etc. of the current SLURM step; None outside SLURM."""
    # Inside `srun` the STEP variables describe this step; a batch script only has the job's.
    num_tasks_name = "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in env else "SLURM_NTASKS"
    if num_tasks_name not in env or "SLURM_PROCID" not in env:
        return None
    nodelist = next(
        (env[name] for name in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST") if env.get(name)),
        None,
    )
    return {
        "num_tasks": _int_variable(env, num_tasks_name),
        "rank": _int_variable(env, "SLURM_PROCID"),
        "local_rank": _int_variable(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else None,
        "nodelist": nodelist,
    }


def _slurm_tasks_on_this_node(env: Mapping[str, str]) -> int:
    if env.get("SLURM_NTASKS_PER_NODE"):
        return _int_variable(env, "SLURM_NTASKS_PER_NODE")
    per_node_name = "SLURM_STEP_TASKS_PER_NODE" if "SLURM_STEP_TASKS_PER_NODE" in env else "SLURM_TASKS_PER_NODE"
    if env.get(per_node_name):
        counts = expand_tasks_per_node(env[per_node_name])
        node = int(env.get("SLURM_NODEID", "0"))
        return counts[node] if node < len(counts) else counts[-1]
    return 1


def _slurm_coordinator_port(env: Mapping[str, str]) -> int:
    # Jobs sharing a node (array tasks, say) need different ports; the job id separates them.
    return 20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000


def _one_process_per_gpu(env: Mapping[str, str]) -> bool:
    """Several tasks on this node that each see all of its GPUs: each must keep its own one."""
    if _slurm_tasks_on_this_node(env) <= 1:
        return False
    visible = [device for device in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if device.strip()]
    # With --gpus-per-task=1 SLURM already hides the other GPUs: the one left is device 0.
    return len(visible) != 1


def plan_initialization(env: Mapping[str, str], backend_hint: str | None = None) -> dict[str, Any] | None:
    """The keyword arguments for `jax.distributed.initialize`, or None for a single process.

    An empty dict means "call it with no arguments" (TPU pods: JAX finds the topology itself).
    backend_hint is "tpu", "gpu" or "cpu"; None infers it from `env` alone.
    Raises ValueError on an incomplete or inconsistent setting, naming the variable to fix.
    """
    backend = backend_hint or detect_backend(env, path_exists=lambda path: False)
    if backend not in BACKENDS:
        raise ValueError(f"backend_hint={backend_hint!r}: expected one of {BACKENDS} or None")
    explicit = {name: env[name] for name in (COORDINATOR_ADDRESS, NUM_PROCESSES, PROCESS_ID) if env.get(name)}
    slurm = _slurm_step(env)

    if backend == "tpu" and not explicit:
        hostnames = [host for host in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if host]
        return None if len(hostnames) == 1 else {}

    if not explicit and (slurm is None or slurm["num_tasks"] <= 1):
        return None

    if NUM_PROCESSES in explicit:
        num_processes = _int_variable(env, NUM_PROCESSES)
    elif slurm is not None:
        num_processes = slurm["num_tasks"]
    else:
        raise ValueError(f"{', '.join(sorted(explicit))} set but {NUM_PROCESSES} is missing")
    if num_processes <= 1:
        return None

    if PROCESS_ID in explicit:
        process_id = _int_variable(env, PROCESS_ID)
    elif slurm is not None:
        process_id = slurm["rank"]
    else:
        raise ValueError(f"{NUM_PROCESSES}={num_processes} but {PROCESS_ID} is missing")
    if not 0 <= process_id < num_processes:
        raise ValueError(f"process id {process_id} is outside [0, {num_processes})")

    if COORDINATOR_ADDRESS in explicit:
        coordinator_address = explicit[COORDINATOR_ADDRESS]
    elif slurm is not None and slurm["nodelist"]:
        port = _int_variable(env, COORDINATOR_PORT) if env.get(COORDINATOR_PORT) else _slurm_coordinator_port(env)
        coordinator_address = f"{expand_nodelist(slurm['nodelist'])[0]}:{port}"
    else:
        raise ValueError(f"{COORDINATOR_ADDRESS} is missing (and no SLURM nodelist to take it from)")
    if not re.fullmatch(r".+:\d+", coordinator_address):
        raise ValueError(f"coordinator address {coordinator_address!r} must be host:port")

    local_device_ids = None
    if env.get(LOCAL_DEVICE_IDS):
        local_device_ids = [int(device) for device in env[LOCAL_DEVICE_IDS].split(",") if device.strip()]
    elif backend == "gpu" and slurm is not None and slurm["local_rank"] is not None and _one_process_per_gpu(env):
        local_device_ids = [slurm["local_rank"]]

    return {
        "coordinator_address": coordinator_address,
        "num_processes": num_processes,
        "process_id": process_id,
        "local_device_ids": local_device_ids,
        # Our plan is complete: JAX's own cluster detection must not second-guess it.
        "cluster_detection_method": "deactivate",
    }


def initialize(backend: str | None = None, env: Mapping[str, str] | None = None) -> dict[str, Any] | None:
    """Starts JAX's distributed runtime if this is one process of several; returns the plan.

    Call before any other JAX work. Calling it again after a successful start does nothing.
    """
    import jax  # Here, so that launchers and plan tests never pay for importing JAX.

    env = os.environ if env is None else env
    backend = backend or detect_backend(env)
    plan = plan_initialization(env, backend)
    if plan is None or jax.distributed.is_initialized():
        return plan
    if backend == "cpu":
        jax.config.update("jax_platforms", "cpu")
        # Cross-process collectives on CPU need gloo (the default in recent JAX, but say so).
        if "jax_cpu_collectives_implementation" in jax.config.values:
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**plan)
    return plan
