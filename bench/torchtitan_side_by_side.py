"""Step time of our trainer vs TorchTitan 0.2.2's, single process on CPU, same shape, batches and initial weights.

    python bench/torchtitan_side_by_side.py [--pairs 3] [--steps 10] [--warmup 3] [--seq_len 256] [--batch 2]
        [--threads 1] [--venv DIR] [--torch_index URL] [--profile]

TorchTitan is installed from PyPI into a throwaway venv (``--venv DIR`` keeps and reuses one) with its own torch:
the same torch release as this interpreter's (``torch==X.Y.Z``, the CPU wheel, ``--torch_index``), so the
comparison is trainer against trainer, not torch against torch. TorchTitan's wheel declares no torch requirement
(its releases are tested against the nightly of their day), and 0.2.2 runs on ours.

Both trainers run our ``debugmodel`` Llama shape (dim 256, 6 layers, 16 heads, 4 KV heads, vocabulary 256) with the
same options (AdamW, clipping 1.0, log every 10 steps, GC every 50, no activation checkpointing, no compile, fp32),
from the same initial weights (the parameter names are the same), on the same random token batches, fed in place of
each trainer's data loader. TorchTitan 0.2.2 has no CPU device path; its worker declares the CPU its device (a few
no-op device hooks for its memory monitor), which changes nothing in its training loop.

A step's time is the process CPU time between two consecutive batch fetches (everything the loop does per step:
forward, backward, clipping, optimizer, logging, checkpoint checks), which a busy neighbour on a shared machine does
not inflate, with ``--threads`` intra-op threads. Runs alternate ours / TorchTitan ``--pairs`` times; each run's median
step is compared with its pair's, and the median of those ratios is the result. Prints a table and writes
``bench/results/torchtitan_side_by_side.json`` (date, hardware, command).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
TORCHTITAN = "torchtitan==0.2.2"
SHAPE = {"dim": 256, "n_layers": 6, "n_heads": 16, "n_kv_heads": 4, "vocab_size": 256, "rope_theta": 500000}
COMMON = {  # the same options for both trainers (both read these keys)
    "--optimizer.lr": "8e-4",
    "--optimizer.eps": "1e-8",
    "--optimizer.weight_decay": "0.1",
    "--optimizer.implementation": "fused",
    "--lr_scheduler.warmup_steps": "2",
    "--training.max_norm": "1.0",
    "--training.gc_freq": "50",
    "--training.mixed_precision_param": "float32",
    "--metrics.log_freq": "10",
    "--activation_checkpoint.mode": "none",
}
# Off in TorchTitan by default (its booleans are flags); set off in ours.
OURS_OFF = ["--metrics.enable_tensorboard", "--compile.enable", "--checkpoint.enable", "--validation.enable",
            "--training.deterministic"]  # fmt: skip


# ---------------------------------------------------------------------------------------------- workers
class _Batches:
    """The shared batches, in the format each trainer's loader yields, with a CPU-time stamp at every fetch."""

    accumulation_steps = 1

    def __init__(self, tokens: Any, fmt: str, stamps: list[float]) -> None:
        self.tokens, self.fmt, self.stamps = tokens, fmt, stamps

    def __iter__(self):
        for window in self.tokens:
            self.stamps.append(time.process_time())
            inputs, labels = window[:, :-1].contiguous(), window[:, 1:].contiguous()
            yield {"input": inputs, "labels": labels} if self.fmt == "ours" else ({"input": inputs}, labels)


def _trainer_args(a: argparse.Namespace, steps: int, folder: str) -> list[str]:
    common = [x for kv in COMMON.items() for x in kv]
    return [*common, "--training.seq_len", str(a.seq_len), "--training.local_batch_size", str(a.batch),
            "--training.steps", str(steps), "--job.dump_folder", folder]  # fmt: skip


def _worker_ours(a: argparse.Namespace, tokens: Any, weights: dict, stamps: list[float]) -> list[float]:
    sys.path.insert(0, str(REPO))
    from torchtitan_hyena.config import ConfigManager
    from torchtitan_hyena.train import Trainer

    args = ["--job.config_file", str(REPO / "train_configs" / "debug_model.toml"), "--job.print_config", "false",
            *(x for key in OURS_OFF for x in (key, "false")), "--training.dataset", "mock",
            "--model.rope_scaling", "llama3",  # TorchTitan 0.2.2 always scales RoPE (Llama 3.1's factors)
            *_trainer_args(a, len(tokens), a.folder)]  # fmt: skip
    trainer = Trainer(ConfigManager().parse_args(args))
    trainer.model_parts[0].load_state_dict(weights)
    trainer.dataloader = _Batches(tokens, "ours", stamps)
    try:
        return trainer.train()
    finally:
        trainer.close()


def _cpu_as_device() -> None:
    """TorchTitan 0.2.2 picks CUDA when no accelerator is found: declare the CPU, with no-op memory-monitor hooks."""
    import torch
    import torch._utils

    torch._utils._get_available_device_type = lambda: "cpu"
    hooks = {
        "get_device_name": lambda *_: platform.processor() or "cpu",
        "get_device_properties": lambda *_: type("Props", (), {"total_memory": 1 << 40})(),
        "reset_peak_memory_stats": lambda *_: None,
        "empty_cache": lambda *_: None,
        "memory_stats": lambda *_: {},
    }
    for name, fn in hooks.items():
        if not hasattr(torch.cpu, name):
            setattr(torch.cpu, name, fn)
    import torchtitan.distributed.utils as dist_utils

    dist_utils.set_pg_timeouts = lambda **_: None  # a barrier with a CUDA device id, after step 1: no CPU meaning


def _worker_torchtitan(a: argparse.Namespace, tokens: Any, weights: dict, stamps: list[float]) -> list[float]:
    _cpu_as_device()
    import dataclasses

    from torchtitan.config import ConfigManager
    from torchtitan.models.llama3 import get_train_spec
    from torchtitan.models.llama3.model.args import TransformerModelArgs
    from torchtitan.protocols.train_spec import register_train_spec
    from torchtitan.train import Trainer

    spec = get_train_spec()
    register_train_spec(
        "bench_llama3",
        dataclasses.replace(
            spec,
            model_args={"bench": TransformerModelArgs(**SHAPE)},
            build_tokenizer_fn=None,
            build_dataloader_fn=lambda **_: _Batches(tokens, "torchtitan", stamps),
        ),
    )
    args = ["--model.name", "bench_llama3", "--model.flavor", "bench", *_trainer_args(a, len(tokens), a.folder)]
    trainer = Trainer(ConfigManager().parse_args(args))
    trainer.model_parts[0].load_state_dict(weights)
    losses: list[float] = []
    log = trainer.metrics_processor.log
    trainer.metrics_processor.log = lambda step, loss, *rest, **kw: (
        losses.append(float(loss)),
        log(step, loss, *rest, **kw),
    )
    trainer.train()
    trainer.close()
    return losses


def worker(a: argparse.Namespace) -> None:
    """One timed run (``--_worker ours|torchtitan``), in the interpreter that has that trainer."""
    import torch

    torch.set_num_threads(a.threads)
    shared = torch.load(a.inputs, weights_only=True)
    stamps: list[float] = []
    run = _worker_ours if a._worker == "ours" else _worker_torchtitan
    if a.profile:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            losses = run(a, shared["tokens"], shared["weights"], stamps)
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40, max_name_column_width=60)
        Path(a.out).with_suffix(".profile.txt").write_text(table)
    else:
        losses = run(a, shared["tokens"], shared["weights"], stamps)
    steps = [t1 - t0 for t0, t1 in zip(stamps, stamps[1:])][a.warmup :]
    out = {"step_s": steps, "median_step_s": statistics.median(steps), "step1_loss": losses[0]}
    out["torch"] = torch.__version__
    Path(a.out).write_text(json.dumps(out))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


# ---------------------------------------------------------------------------------------------- driver
def make_venv(folder: Path, torch_version: str, torch_index: str) -> Path:
    """A venv with TorchTitan 0.2.2, its dependencies and the pinned CPU torch (reused when already there)."""
    python = folder / "bin" / "python"
    if python.exists() and subprocess.run([python, "-c", "import torchtitan"], capture_output=True).returncode == 0:
        return python
    subprocess.run([sys.executable, "-m", "venv", str(folder)], check=True)
    pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    print(f"installing torch=={torch_version} (CPU) and {TORCHTITAN} into {folder} ...", flush=True)
    subprocess.run([*pip, "--no-deps", f"torch=={torch_version}", "--extra-index-url", torch_index], check=True)
    subprocess.run([*pip, TORCHTITAN, "triton", f"torch=={torch_version}"], check=True)  # triton: its MoE imports it
    return python


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_one(python: Path, which: str, a: argparse.Namespace, inputs: Path, tmp: Path, index: int) -> dict:
    out = tmp / f"{which}-{index}.json"
    env = {**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "OMP_NUM_THREADS": str(a.threads)}  # fmt: skip
    cmd = [str(python), __file__, "--_worker", which, "--inputs", str(inputs), "--out", str(out),
           "--folder", str(tmp / f"{which}-{index}"), "--seq_len", str(a.seq_len), "--batch", str(a.batch),
           "--warmup", str(a.warmup), "--threads", str(a.threads), *(["--profile"] if a.profile else [])]  # fmt: skip
    proc = subprocess.run(cmd, env=env, cwd=tmp, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{which} run failed:\n{proc.stderr[-4000:]}")
    if a.profile:
        print(
            f"--- {which}, run {index + 1}: torch profiler, by self CPU time\n"
            + out.with_suffix(".profile.txt").read_text()
        )
    return json.loads(out.read_text())


def shared_inputs(a: argparse.Namespace, path: Path) -> None:
    """Initial weights (our debugmodel, as our trainer initializes it) and the token batches, for both sides."""
    import torch

    sys.path.insert(0, str(REPO))
    from torchtitan_hyena.build import meta_model
    from torchtitan_hyena.protocols.train_spec import get_flavor_args, get_train_spec

    spec = get_train_spec("llama3")
    model = meta_model(spec, get_flavor_args(spec, "debugmodel"))
    model.to_empty(device="cpu")
    with torch.no_grad():
        model.init_weights(seed=0)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, SHAPE["vocab_size"], (a.warmup + a.steps + 1, a.batch, a.seq_len + 1), generator=gen)
    torch.save({"weights": model.state_dict(), "tokens": tokens}, path)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=3, help="interleaved (ours, TorchTitan) pairs of runs")
    p.add_argument("--steps", type=int, default=10, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=3, help="untimed first steps per run")
    p.add_argument("--seq_len", type=int, default=256)
    p.add_argument("--batch", type=int, default=2, help="sequences per step")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads of each run")
    p.add_argument("--venv", default="", help="TorchTitan venv to create or reuse (default: a throwaway one)")
    p.add_argument("--torch_index", default="https://download.pytorch.org/whl/cpu", help="where the CPU torch is")
    p.add_argument("--profile", action="store_true", help="also write each run's torch profiler table (slower)")
    for hidden in ("--_worker", "--inputs", "--out", "--folder"):
        p.add_argument(hidden, default="", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a._worker:
        worker(a)
        return
    import torch

    torch_version = torch.__version__.split("+")[0]
    with tempfile.TemporaryDirectory(prefix="torchtitan_side_by_side_") as tmp_name:
        tmp = Path(tmp_name)
        titan_python = make_venv(Path(a.venv) if a.venv else tmp / "venv", torch_version, a.torch_index)
        inputs = tmp / "inputs.pt"
        shared_inputs(a, inputs)
        rows = []
        for i in range(a.pairs):
            ours = run_one(Path(sys.executable), "ours", a, inputs, tmp, i)
            titan = run_one(titan_python, "torchtitan", a, inputs, tmp, i)
            rows.append({"ours": ours, "torchtitan": titan, "ratio": ours["median_step_s"] / titan["median_step_s"]})
            print(f"pair {i + 1}: ours {ours['median_step_s'] * 1e3:7.1f} ms  TorchTitan "
                  f"{titan['median_step_s'] * 1e3:7.1f} ms  ratio {rows[-1]['ratio']:.3f}", flush=True)  # fmt: skip
    ratio = statistics.median(r["ratio"] for r in rows)
    print(f"\nmedian ratio ours / TorchTitan 0.2.2 step time: {ratio:.3f}  ({a.pairs} pairs, {a.steps} steps each)")
    print(f"step 1 loss: ours {rows[-1]['ours']['step1_loss']}, TorchTitan {rows[-1]['torchtitan']['step1_loss']}")
    record = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "hardware": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {a.threads} thread(s)",
        "command": shlex.join(["python", "bench/torchtitan_side_by_side.py", *(argv or sys.argv[1:])]),
        "torch": torch.__version__,
        "torchtitan": TORCHTITAN,
        "shape": {**SHAPE, "seq_len": a.seq_len, "batch": a.batch},
        "median_ratio": ratio,
        "pairs": rows,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "torchtitan_side_by_side.json").write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
