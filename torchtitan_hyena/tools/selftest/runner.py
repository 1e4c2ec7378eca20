"""The self-test's entry point, :func:`main`: arguments, device, the sections in order, the report (usage: the
package docstring)."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from torchtitan_hyena.distributed.utils import init_distributed
from torchtitan_hyena.errors import UserError
from torchtitan_hyena.ops import triton_conv
from torchtitan_hyena.tools.conv_bench import timer
from torchtitan_hyena.tools.logging import init_logger
from torchtitan_hyena.tools.outputs import check_writable_file
from torchtitan_hyena.tools.selftest import kernels, speed, training
from torchtitan_hyena.tools.selftest.plan import PLANS, Plan
from torchtitan_hyena.tools.selftest.report import Report, default_output

SECTIONS = ("kernels", "training", "speed", "throughput", "comm")
# Printed columns per section (the JSON keeps every number).
COLUMNS = {
    "correctness": ["check", "status", "detail"],
    "errors": ["check", "status", "detail"],
    "kernel speed": ["op", "L", "impl", "fwd_ms", "bwd_ms", "total_ms", "total_GBps", "total_frac_clone",
                     "speedup_conv1d_total", "speedup_fft_total", "error"],
    "LI conv": ["impl", "L", "D", "fwd_ms", "fwd_bwd_ms", "io_mib", "peak_mib", "error"],
    "throughput": ["model", "AC", "compile", "step_s", "tokens_per_s", "mfu_pct", "peak_gib", "dry_run_peak_gib",
                   "error"],
}  # fmt: skip


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m torchtitan_hyena.tools.selftest",
        description="Device self-test: kernels, flash-attn, float8 and compiled training steps against references; "
        "kernel speed; model throughput, MFU and memory against the dry run; bandwidth under torchrun. Prints tables, "
        "writes JSON, exits 1 when a correctness check fails.",
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="fewer lengths and configurations (about a minute)")
    mode.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, Triton interpreter (for tests)")
    p.add_argument("--output", type=Path, help="JSON path (default bench/results/selftest_<device>_<date>.json)")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, of {', '.join(SECTIONS)}")
    args = p.parse_args(argv)
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(args.sections) - set(SECTIONS))
    if unknown or not args.sections:
        raise UserError(f"--sections got {', '.join(unknown) or 'nothing'}; choose from {', '.join(SECTIONS)}")
    return args


def select_device(smoke: bool) -> torch.device:
    """The GPU of this rank, or the CPU for --smoke; refuses a mode the kernels were not set up for."""
    if smoke:
        if torch.cuda.is_available() or not triton_conv.INTERPRETED:
            raise UserError(
                "--smoke runs on CPU with the Triton interpreter: start it as python -m "
                "torchtitan_hyena.tools.selftest --smoke (it hides the GPUs and sets TRITON_INTERPRET=1 before the "
                "kernels load)"
            )
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UserError("no GPU is visible: the self-test checks a GPU install; on a CPU machine run it with --smoke")
    if triton_conv.INTERPRETED:
        raise UserError("TRITON_INTERPRET=1 is set, so the kernels would not be compiled; unset it (or use --smoke)")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    torch.cuda.set_device(device)
    return device


def run(report: Report, plan: Plan, sections: list[str], device: torch.device) -> None:
    """Every requested section, each part on its own (a part that raises is a failed row, the rest still run), in
    an order that needs no process group until the trainers: the dry run refuses one."""
    bench = timer(device, plan.timer_reps, plan.timer_warmup)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    parts = {
        "kernels": [
            ("conv kernels", lambda: kernels.check_convs(report, plan.conv_shape, device)),
            ("LI kernels", lambda: kernels.check_li(report, plan.li_lengths, plan.li_batch, plan.li_channels, device)),
            ("flash-attn", lambda: kernels.check_flash(report, plan.attention_shape, device)),
            ("float8", lambda: kernels.check_float8(report, device)),
        ],
        "speed": [
            ("conv speed", lambda: speed.conv_speed(report, plan, device, bench)),
            ("LI speed", lambda: speed.li_speed(report, plan, device, bench)),
        ],
    }
    for section in ("kernels", "speed"):
        for name, fn in parts[section] if section in sections else ():
            with report.part(name):
                fn()
    predicted: dict = {}
    if "throughput" in sections:
        with report.part("dry runs"):
            predicted = training.predict_peaks(plan, device, world)
    if world > 1:
        init_distributed(300)
    if "training" in sections:
        with report.part("compiled steps"):
            training.check_compiled_steps(report, plan)
    if "throughput" in sections:
        with report.part("throughput"):
            training.measure_throughput(report, plan, predicted)
    if "comm" in sections and world > 1:
        with report.part("communication"):
            training.measure_comm(report, plan, device)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    init_logger()
    device = select_device(args.smoke)
    report = Report(mode, device)
    output = args.output or default_output(device, report.started.date())
    check_writable_file(output, "--output")
    own_group = not dist.is_initialized()  # the trainers create one when none exists
    writer = int(os.environ.get("RANK", "0")) == 0
    try:
        run(report, PLANS[mode], args.sections, device)
        failed = len(report.failures)
        if dist.is_initialized() and dist.get_world_size() > 1:  # every rank checked its own device
            total = torch.tensor([failed], device=device)
            dist.all_reduce(total)
            failed = int(total.item())
        if writer:
            report.print_tables(COLUMNS)
            command = " ".join(["python -m torchtitan_hyena.tools.selftest", *(sys.argv[1:] if argv is None else argv)])
            extra = {"command": command, "plan": dataclasses.asdict(PLANS[mode]), "sections_run": args.sections}
            report.write(output, extra)
            print(f"\nwrote {output}")
    finally:
        if own_group and dist.is_initialized():
            dist.destroy_process_group()
    if failed:
        if writer:
            print(f"selftest FAILED: {failed} check(s) failed" + "".join(f"\n  {f}" for f in report.failures))
        raise SystemExit(1)
    if writer:
        print("selftest passed")
