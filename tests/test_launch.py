"""Distributed start-up decisions and the launchers' dry runs (nothing is started or submitted)."""

import importlib.util
import os
import shlex

import pytest

from bclip import distributed

_LAUNCH_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "launch")


def _launcher(name):
    spec = importlib.util.spec_from_file_location(f"test_launch_{name}", os.path.join(_LAUNCH_DIR, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


local = _launcher("local")
slurm = _launcher("slurm")
tpu_pod = _launcher("tpu_pod")


# ---------------------------------------------------------------------------------------------
# SLURM strings
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "nodelist, hosts",
    [
        ("node01", ["node01"]),
        ("node[01-03,07]", ["node01", "node02", "node03", "node07"]),
        ("node[08-10]", ["node08", "node09", "node10"]),
        ("gpu[1-2],cpu7", ["gpu1", "gpu2", "cpu7"]),
        ("a[9-11]", ["a9", "a10", "a11"]),
        ("rack[1-2]-n[3,5]", ["rack1-n3", "rack1-n5", "rack2-n3", "rack2-n5"]),
        ("x-1,y[2]", ["x-1", "y2"]),
    ],
)
def test_expand_nodelist(nodelist, hosts):
    assert distributed.expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("nodelist", ["node[01-03", "node01]", "node[3-1]", "node[a-b]"])
def test_expand_nodelist_rejects_malformed(nodelist):
    with pytest.raises(ValueError):
        distributed.expand_nodelist(nodelist)


def test_expand_tasks_per_node():
    assert distributed.expand_tasks_per_node("4(x2),3") == [4, 4, 3]
    assert distributed.expand_tasks_per_node("8") == [8]


# ---------------------------------------------------------------------------------------------
# plan_initialization
# ---------------------------------------------------------------------------------------------


def _slurm_env(**extra):
    env = {
        "SLURM_JOB_ID": "1234",
        "SLURM_NTASKS": "16",
        "SLURM_PROCID": "9",
        "SLURM_LOCALID": "1",
        "SLURM_NODEID": "1",
        "SLURM_NODELIST": "gpu[07-08]",
        "SLURM_NTASKS_PER_NODE": "8",
        "CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7",
    }
    env.update(extra)
    return env


def test_plan_single_host_is_none():
    assert distributed.plan_initialization({}, "cpu") is None
    assert distributed.plan_initialization({}, "gpu") is None
    assert distributed.plan_initialization({"SLURM_NTASKS": "1", "SLURM_PROCID": "0"}, "gpu") is None


def test_plan_tpu_pod_lets_jax_detect():
    assert distributed.plan_initialization({}, "tpu") == {}
    assert distributed.plan_initialization({"TPU_WORKER_HOSTNAMES": "a,b,c,d"}, None) == {}
    assert distributed.plan_initialization({"TPU_WORKER_HOSTNAMES": "only"}, "tpu") is None


def test_plan_slurm_one_process_per_gpu():
    plan = distributed.plan_initialization(_slurm_env(), "gpu")
    assert plan == {
        "coordinator_address": f"gpu07:{20000 + 1234 % 20000}",
        "num_processes": 16,
        "process_id": 9,
        "local_device_ids": [1],
        "cluster_detection_method": "deactivate",
    }


def test_plan_slurm_gpus_bound_per_task_keeps_device_zero_visible():
    plan = distributed.plan_initialization(_slurm_env(CUDA_VISIBLE_DEVICES="5"), "gpu")
    assert plan["local_device_ids"] is None


def test_plan_slurm_one_process_per_node_uses_all_gpus():
    env = _slurm_env(SLURM_NTASKS="2", SLURM_PROCID="1", SLURM_LOCALID="0", SLURM_NTASKS_PER_NODE="1")
    plan = distributed.plan_initialization(env, "gpu")
    assert (plan["num_processes"], plan["process_id"], plan["local_device_ids"]) == (2, 1, None)


def test_plan_slurm_step_variables_and_tasks_per_node():
    env = _slurm_env(SLURM_STEP_NUM_TASKS="4", SLURM_STEP_NODELIST="n[3-4]", SLURM_PROCID="3")
    del env["SLURM_NTASKS_PER_NODE"]
    env["SLURM_TASKS_PER_NODE"] = "2(x2)"
    plan = distributed.plan_initialization(env, "gpu")
    assert plan["coordinator_address"].startswith("n3:")
    assert (plan["num_processes"], plan["process_id"], plan["local_device_ids"]) == (4, 3, [1])


def test_plan_slurm_with_coordinator_from_sbatch_script():
    env = _slurm_env(BCLIP_COORDINATOR_ADDRESS="gpu07:23456")
    plan = distributed.plan_initialization(env, "gpu")
    assert (plan["coordinator_address"], plan["num_processes"], plan["process_id"]) == ("gpu07:23456", 16, 9)


def test_plan_explicit_cpu_processes():
    env = {"BCLIP_COORDINATOR_ADDRESS": "localhost:4321", "BCLIP_NUM_PROCESSES": "2", "BCLIP_PROCESS_ID": "1"}
    plan = distributed.plan_initialization(env, "cpu")
    assert plan == {
        "coordinator_address": "localhost:4321",
        "num_processes": 2,
        "process_id": 1,
        "local_device_ids": None,
        "cluster_detection_method": "deactivate",
    }
    plan = distributed.plan_initialization({**env, "BCLIP_LOCAL_DEVICE_IDS": "2,3"}, "gpu")
    assert plan["local_device_ids"] == [2, 3]


@pytest.mark.parametrize(
    "env, message",
    [
        ({"BCLIP_COORDINATOR_ADDRESS": "h:1", "BCLIP_PROCESS_ID": "0"}, "BCLIP_NUM_PROCESSES"),
        ({"BCLIP_COORDINATOR_ADDRESS": "h:1", "BCLIP_NUM_PROCESSES": "2"}, "BCLIP_PROCESS_ID"),
        ({"BCLIP_NUM_PROCESSES": "2", "BCLIP_PROCESS_ID": "0"}, "BCLIP_COORDINATOR_ADDRESS"),
        ({"BCLIP_COORDINATOR_ADDRESS": "h:1", "BCLIP_NUM_PROCESSES": "2", "BCLIP_PROCESS_ID": "2"}, "outside"),
        ({"BCLIP_COORDINATOR_ADDRESS": "h", "BCLIP_NUM_PROCESSES": "2", "BCLIP_PROCESS_ID": "0"}, "host:port"),
        ({"BCLIP_COORDINATOR_ADDRESS": "h:1", "BCLIP_NUM_PROCESSES": "two", "BCLIP_PROCESS_ID": "0"}, "integer"),
    ],
)
def test_plan_explicit_errors_name_the_variable(env, message):
    with pytest.raises(ValueError, match=message):
        distributed.plan_initialization(env, "cpu")


def test_detect_backend():
    never = lambda path: False  # noqa: E731
    assert distributed.detect_backend({"BCLIP_BACKEND": "TPU"}, never) == "tpu"
    assert distributed.detect_backend({"JAX_PLATFORMS": "cuda,cpu"}, never) == "gpu"
    assert distributed.detect_backend({"TPU_ACCELERATOR_TYPE": "v4-32"}, never) == "tpu"
    assert distributed.detect_backend({}, lambda path: path == "/dev/nvidia0") == "gpu"
    assert distributed.detect_backend({}, never) == "cpu"
    with pytest.raises(ValueError, match="BCLIP_BACKEND"):
        distributed.detect_backend({"BCLIP_BACKEND": "npu"}, never)


@pytest.fixture
def jax_start_calls(monkeypatch):
    """Records, instead of making, the calls `distributed.initialize` may make into JAX."""
    import jax

    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kwargs: calls.append(("initialize", kwargs)))
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(jax.config, "update", lambda name, value: calls.append(("config", name, value)))
    return calls


def test_initialize_single_process_does_nothing(jax_start_calls):
    assert distributed.initialize(env={}) is None
    assert distributed.initialize(backend="gpu", env={"SLURM_NTASKS": "1", "SLURM_PROCID": "0"}) is None
    assert jax_start_calls == []  # no runtime started, no JAX setting changed


def test_initialize_several_processes_starts_jax_with_the_plan(jax_start_calls):
    env = {"BCLIP_COORDINATOR_ADDRESS": "localhost:4321", "BCLIP_NUM_PROCESSES": "2", "BCLIP_PROCESS_ID": "1"}
    plan = distributed.initialize(backend="gpu", env=env)
    assert jax_start_calls == [("initialize", plan)]
    assert plan["coordinator_address"] == "localhost:4321" and plan["process_id"] == 1


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------


def _value_after(argv, flag):
    return argv[argv.index(flag) + 1]


def test_local_dry_run_single_process(capsys):
    config = "configs/my sweep.py:tiny"
    argv = ["--config", config, "--workdir", "/tmp/r 1", "--config.optim.learning_rate=0.0001", "--dry_run"]
    assert local.main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    argv = shlex.split(lines[0])
    assert argv[1:3] == ["-m", "bclip.main"]
    assert _value_after(argv, "--config") == config
    assert _value_after(argv, "--workdir") == "/tmp/r 1"
    assert argv[-1] == "--config.optim.learning_rate=0.0001"


def test_local_dry_run_cpu_processes(capsys):
    argv = ["--config", "c.py", "--workdir", "/tmp/w", "--num_processes", "3", "--cpu_devices_per_process", "2",
            "--port", "4567", "--python", "python", "--dry_run", "--", "--config.seed=3"]
    assert local.main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3
    for process_id, line in enumerate(lines):
        words = shlex.split(line)
        assert words[0] == "env"
        env = dict(word.split("=", 1) for word in words[1:words.index("python")])
        assert env == {
            "JAX_PLATFORMS": "cpu",
            "BCLIP_BACKEND": "cpu",
            "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
            "BCLIP_COORDINATOR_ADDRESS": "localhost:4567",
            "BCLIP_NUM_PROCESSES": "3",
            "BCLIP_PROCESS_ID": str(process_id),
        }
        assert words[words.index("python"):] == [
            "python", "-m", "bclip.main", "--config", "c.py", "--workdir", "/tmp/w", "--config.seed=3"]
        # The plan each process would make from that environment.
        plan = distributed.plan_initialization(env, None)
        assert (plan["num_processes"], plan["process_id"]) == (3, process_id)


def test_slurm_dry_run_script(capsys, tmp_path):
    workdir = tmp_path / "run one"
    argv = ["--config", "configs/x.py:arg", "--workdir", str(workdir), "--nodes", "2", "--gpus_per_node", "4",
            "--partition", "gpu", "--time", "12:00:00", "--setup", "source /venv/bin/activate",
            "--sbatch_option", "constraint=h100", "--python", "python", "--dry_run",
            "--config.optim.learning_rate=0.001"]
    assert slurm.main(argv) == 0
    out = capsys.readouterr().out
    assert not workdir.exists()  # A dry run writes nothing.
    for directive in ["--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4", "--partition=gpu",
                      "--time=12:00:00", "--constraint=h100", "--job-name=bclip"]:
        assert f"#SBATCH {directive}\n" in out
    assert f"#SBATCH --output={shlex.quote(str(workdir / 'slurm-%j.out'))}\n" in out
    assert "source /venv/bin/activate\n" in out
    assert 'scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1' in out
    assert "export BCLIP_BACKEND=gpu" in out
    srun_line = next(line for line in out.splitlines() if line.startswith("srun "))
    words = shlex.split(srun_line)
    assert words[:2] == ["srun", "--kill-on-bad-exit=1"]
    assert words[2:] == ["python", "-m", "bclip.main", "--config", "configs/x.py:arg", "--workdir", str(workdir),
                         "--config.optim.learning_rate=0.001"]
    assert out.strip().splitlines()[-1] == shlex.join(["sbatch", str(workdir / "job.sbatch")])
    # Directives come before the first command, as sbatch requires.
    lines = out.splitlines()
    assert max(i for i, line in enumerate(lines) if line.startswith("#SBATCH")) < lines.index("set -eo pipefail")


def test_slurm_array_spec():
    assert slurm.array_spec([0, 1, 2, 5]) == "0-2,5"
    assert slurm.array_spec([7, 3, 4], parallel=2) == "3-4,7%2"
    with pytest.raises(ValueError):
        slurm.array_spec([])


def test_slurm_array_script_reads_runs_from_plan(capsys):
    resources = slurm.resource_parser().parse_args(["--gpus_per_node", "0", "--python", "py"])
    assert slurm.submit_array(resources, "/shared/sweep/sweep.json", [0, 2, 3], parallel=4, dry_run=True) == 0
    out = capsys.readouterr().out
    assert "#SBATCH --array=0,2-3%4\n" in out
    assert "#SBATCH --output=/shared/sweep/slurm-%A_%a.out\n" in out
    assert "#SBATCH --ntasks-per-node=1\n" in out and "gpus-per-node" not in out
    assert "export BCLIP_BACKEND=cpu" in out
    srun = 'srun --kill-on-bad-exit=1 py -m bclip.sweep --plan /shared/sweep/sweep.json --run_index'
    srun += ' "$SLURM_ARRAY_TASK_ID"'
    assert srun in out


def test_slurm_rejects_line_breaks_in_directives():
    resources = slurm.resource_parser().parse_args(["--partition", "gpu\n#SBATCH --x=y"])
    with pytest.raises(ValueError, match="line break"):
        slurm.sbatch_script(resources, "true", output="/tmp/o")


def test_tpu_pod_dry_run_git_install_and_run(capsys):
    argv = ["--name", "pod-1", "--zone", "us-central2-b", "--project", "proj", "--create",
            "--accelerator_type", "v4-32", "--version", "tpu-ubuntu2204-base", "--install", "git",
            "--repo", "https://example.com/bclip.git", "--ref", "v1 beta",
            "--config", "configs/x.py:arg", "--workdir", "gs://bucket/runs/a b",
            "--config.objective.ssl_weight=2.0", "--dry_run"]
    assert tpu_pod.main(argv) == 0
    lines = [shlex.split(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert len(lines) == 3
    create, install, run = lines
    assert create[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "pod-1"]
    assert _value_after(create, "--accelerator-type") == "v4-32"
    assert _value_after(create, "--version") == "tpu-ubuntu2204-base"
    for command in (install, run):
        assert command[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod-1"]
        assert _value_after(command, "--zone") == "us-central2-b"
        assert _value_after(command, "--project") == "proj"
        assert "--worker=all" in command
    install_script = _value_after(install, "--command")
    assert "git fetch --quiet --depth 1 origin 'v1 beta'" in install_script
    assert "https://example.com/bclip.git" in install_script
    # The gcs extra (google-cloud-storage) lets Orbax write the gs:// checkpoints.
    assert "pip install --quiet -e 'bclip[gcs]' 'jax[tpu]' -c bclip/constraints.txt" in install_script
    remote = shlex.split(_value_after(run, "--command"))
    assert remote[:3] == ["cd", "bclip", "&&"]
    assert "BCLIP_BACKEND=tpu" in remote
    main = remote[remote.index("BCLIP_BACKEND=tpu") + 1:]
    assert main == ["python3", "-m", "bclip.main", "--config", "configs/x.py:arg", "--workdir",
                    "gs://bucket/runs/a b", "--config.objective.ssl_weight=2.0"]


def test_tpu_pod_dry_run_copy_install(capsys):
    argv = ["--name", "p", "--zone", "z", "--install", "copy", "--source", "/src/bclip",
            "--config", "c.py", "--workdir", "gs://b/r", "--constraints", "", "--dry_run"]
    assert tpu_pod.main(argv) == 0
    pack, upload, unpack, run = [shlex.split(line) for line in capsys.readouterr().out.strip().splitlines()]
    # --constraints '' installs the newest versions: no -c.
    assert _value_after(unpack, "--command").endswith("-e 'bclip[gcs]' 'jax[tpu]'")
    assert pack[:2] == ["tar", "-czf"] and pack[-3:] == ["-C", "/src/bclip", "."]
    assert upload[4] == "scp" and upload[5] == pack[2] and upload[6] == "p:bclip.tar.gz" and "--worker=all" in upload
    assert "tar -xzf bclip.tar.gz -C bclip" in _value_after(unpack, "--command")
    assert "--worker=all" in run


@pytest.mark.parametrize(
    "create_flags",
    [[], ["--version", "tpu-ubuntu2204-base"], ["--accelerator_type", "v4-32"]],
    ids=["neither", "no_accelerator", "no_version"],
)
def test_tpu_pod_create_needs_accelerator(capsys, create_flags):
    run_flags = ["--config", "c.py", "--workdir", "gs://b", "--dry_run"]
    with pytest.raises(SystemExit) as exit_info:
        tpu_pod.main(["--name", "p", "--zone", "z", "--create", *create_flags, *run_flags])
    # argparse's usage error (exit status 2) with the launcher's own message, not any other exit.
    assert exit_info.value.code == 2
    assert "--create needs --accelerator_type and --version" in capsys.readouterr().err
    # With both given, the same command line creates the VM first.
    both = ["--accelerator_type", "v4-32", "--version", "tpu-ubuntu2204-base"]
    assert tpu_pod.main(["--name", "p", "--zone", "z", "--create", *both, *run_flags]) == 0
    create = shlex.split(capsys.readouterr().out.splitlines()[0])
    assert create[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "p"]
    assert _value_after(create, "--accelerator-type") == "v4-32"
    assert _value_after(create, "--version") == "tpu-ubuntu2204-base"


# ---------------------------------------------------------------------------------------------
# A real two-process start-up on CPU
# ---------------------------------------------------------------------------------------------

_SUM_ACROSS_PROCESSES = """
from bclip import distributed
distributed.initialize()
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

mesh = jax.make_mesh((jax.device_count(),), ("devices",))
local = np.full((jax.local_device_count(),), jax.process_index() + 1.0, np.float32)
values = jax.make_array_from_process_local_data(NamedSharding(mesh, PartitionSpec("devices")), local)
total = jax.jit(lambda x: x.sum(), out_shardings=NamedSharding(mesh, PartitionSpec()))(values)
print("RESULT", jax.process_index(), jax.process_count(), jax.device_count(), float(total))
"""


@pytest.mark.slow
def test_two_cpu_processes_start_and_reduce(tmp_path):
    """The local launcher's environment makes two processes of one 4-device job (about 3 s)."""
    import subprocess
    import sys

    script = tmp_path / "sum.py"
    script.write_text(_SUM_ACROSS_PROCESSES)
    commands = local.process_commands(sys.executable, "unused", "unused", [], num_processes=2,
                                      cpu_devices_per_process=2, port=local.free_port())
    processes = [
        subprocess.Popen([sys.executable, str(script)], env={**os.environ, **env}, stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL, text=True)
        for env, _ in commands
    ]
    outputs = [process.communicate(timeout=60)[0] for process in processes]
    results = sorted(line for output in outputs for line in output.splitlines() if line.startswith("RESULT"))
    # Process i contributes i + 1 on each of its 2 devices: 2 * 1 + 2 * 2 = 6.
    assert results == ["RESULT 0 2 4 6.0", "RESULT 1 2 4 6.0"]
