"""Layout planner: the fastest parallel layouts of a job that run and fit, on N nodes of a device.

    python -m torchtitan_hyena.plan --job.config_file X.toml --nodes N [--device mi250x|mi300x|h100|h200]
        [--top K] [--write OUT.toml] [--profile FILE] [--section.key value ...]

It reads the model once from the real build (``tools/planner/census.py``), enumerates layouts (DP replicate x
shard, TP, CP and its methods, PP and its schedule, activation checkpointing, local batch), drops those the
project's checks reject or the dry run's memory model does not fit, ranks the rest by a step-time model
(``tools/planner/step_time.py``; README "Layout planner"), prints the top K next to the job's own layout, runs the
full-size dry run of the best one (the real mesh and parallelize plan on a fake process group), and prints (or
with ``--write`` writes) the config that runs it.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path
from typing import Any

import tomli_w
from tabulate import tabulate

from torchtitan_hyena.config import ConfigManager, JobConfig
from torchtitan_hyena.errors import ConfigError, run_cli
from torchtitan_hyena.tools.dry_run import GIB, dry_run, target_accelerator
from torchtitan_hyena.tools.logging import init_logger
from torchtitan_hyena.tools.planner.census import take_census
from torchtitan_hyena.tools.planner.profiles import PROFILES, load_profile
from torchtitan_hyena.tools.planner.search import Candidate, evaluate, search
from torchtitan_hyena.tools.world_size import required_world_size


def split_flags(argv: list[str]) -> tuple[list[str], argparse.Namespace]:
    """The planner's own flags; the rest are config options."""
    p = argparse.ArgumentParser(prog="python -m torchtitan_hyena.plan", add_help=False)
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--device", default="mi250x")
    p.add_argument("--top", type=int, default=5)
    p.add_argument("--write", default="")
    p.add_argument("--profile", default="")
    known = {"--nodes", "--device", "--top", "--write", "--profile"}
    mine, rest, i = [], [], 0
    while i < len(argv):
        name = argv[i].partition("=")[0]
        if name in known:
            takes = "=" not in argv[i]
            mine += argv[i : i + 1 + takes]
            i += 1 + takes
        else:
            rest.append(argv[i])
            i += 1
    if not any(a.partition("=")[0] == "--nodes" for a in mine):
        raise ConfigError("--nodes N is required: the number of nodes to plan for")
    try:
        flags = p.parse_args(mine)
    except SystemExit:
        raise ConfigError(f"bad planner flags {' '.join(mine)}; see python -m torchtitan_hyena.plan --help") from None
    if flags.nodes < 1 or flags.top < 1:
        raise ConfigError("--nodes and --top must be positive integers")
    if flags.device not in PROFILES:
        raise ConfigError(f"--device must be one of {', '.join(PROFILES)}, got {flags.device!r}")
    return rest, flags


def row(name: str, c: Candidate) -> list[Any]:
    p = c.config.parallelism
    methods = "-"
    if p.context_parallel_degree > 1:
        methods = f"{p.context_parallel_rotate_method}/{p.context_parallel_mr_method}"
    pipeline = "-"
    if p.pipeline_parallel_degree > 1:
        pipeline = f"{p.pipeline_parallel_schedule} mb {p.pipeline_parallel_microbatch_size}"
    ac = c.config.activation_checkpoint
    t = c.time
    return [
        name, c.layout, methods, pipeline, ac.mode + (f" {ac.selective_ac_option}" if ac.mode == "selective" else ""),
        c.config.training.local_batch_size, f"{c.memory['total'] / GIB:.1f}", f"{t.seconds:.2f}",
        f"{100 * (t.exposed_comm + max(0.0, t.overlapped_comm - t.compute)) / t.seconds:.0f}",
        f"{c.tokens_per_s_per_device:,.0f}", f"{100 * c.mfu:.1f}",
    ]  # fmt: skip


HEADERS = ["", "layout", "CP attn/MR", "PP", "AC", "local batch", "GiB/dev", "step s", "exposed comm %", "tok/s/dev",
           "MFU %"]  # fmt: skip


def toml_text(config: JobConfig) -> str:
    """The config as TOML: every key that differs from the defaults."""
    defaults, out = JobConfig(), {}
    for section in dataclasses.fields(JobConfig):
        ours, base = getattr(config, section.name), getattr(defaults, section.name)
        keys = {
            f.name: getattr(ours, f.name)
            for f in dataclasses.fields(ours)
            if getattr(ours, f.name) != getattr(base, f.name) and f.name != "config_file"
        }
        if keys:
            out[section.name] = keys
    return tomli_w.dumps(out)


def run(config: JobConfig, flags: argparse.Namespace) -> tuple[list[Candidate], Candidate | str]:
    """Plan, print, and (``--write``) write; returns the ranked layouts and the job's own (or why it cannot run)."""
    init_logger()
    profile = load_profile(flags.device, flags.profile)
    target = target_accelerator(flags.device)
    world = flags.nodes * profile.gpus_per_node
    census = take_census(config, target)
    ranked, rejected = search(census, config, world, profile, target)
    name = config.job.config_file or "(defaults)"
    reasons = ", ".join(f"{n} {why}" for why, n in rejected.items()) or "none"
    print(f"\nplan for {name} on {flags.nodes} x {profile.gpus_per_node} {flags.device} ({world} devices): "
          f"{len(ranked)} layouts run and fit; discarded: {reasons}")  # fmt: skip
    rows = [row(f"#{i + 1}", c) for i, c in enumerate(ranked[: flags.top])]
    try:
        own_world = required_world_size(config)
    except ConfigError:
        own_world = world
    own: Candidate | str = f"the job's layout needs {own_world} devices, not {world}"
    if own_world == world:
        own = evaluate(census, config, {}, world, profile, target)
    rows.append(row("job", own) if isinstance(own, Candidate) else ["job", f"does not run: {own}"])
    print(tabulate(rows, headers=HEADERS, disable_numparse=True), flush=True)
    if not ranked:
        raise ConfigError(
            f"no layout of {name} runs and fits on {world} {flags.device} devices; add nodes or lower "
            "training.seq_len / the global batch"
        )
    best = _verified(ranked, world, flags.device)
    text = toml_text(best.config)
    print("\noverrides:", " ".join(f"--{k} {_cli(v)}" for k, v in best.overrides.items()), flush=True)
    sections: dict[str, dict[str, Any]] = {}
    for key, value in best.overrides.items():
        section, name = key.split(".")
        sections.setdefault(section, {})[name] = value
    print(f"\nas TOML:\n{tomli_w.dumps(sections)}", flush=True)
    if flags.write:
        out = Path(flags.write)
        tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
        tmp.write_text(f"# planned by: python -m torchtitan_hyena.plan {' '.join(sys.argv[1:])}\n{text}")
        tmp.replace(out)
        print(f"wrote {out}", flush=True)
    return ranked, own


def _verified(ranked: list[Candidate], world: int, device: str) -> Candidate:
    """The best layout whose full-size dry run fits (the dry run builds the real mesh and plan)."""
    for candidate in ranked[:5]:
        report = dry_run(candidate.config, world, device)
        print(f"\ndry run of the best layout ({candidate.layout}):\n{report.table()}", flush=True)
        if report.fits:
            return candidate
    raise ConfigError("none of the 5 best layouts passed the full-size dry run; please report this planner bug")


def _cli(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return ",".join(value) if value else '""'
    return str(value)


def main(argv: list[str] | None = None) -> None:
    rest, flags = split_flags(list(sys.argv[1:] if argv is None else argv))
    config = ConfigManager().parse_args(rest)
    run(config, flags)


if __name__ == "__main__":
    run_cli(main)
