"""Full-scale dry run: the real mesh, model and parallelize plan in one process, and a memory verdict.

    python -m torchtitan_hyena.train --job.config_file X.toml --dry_run --world_size 512 [--device mi250x]

One process plays rank 0 of ``world_size`` on torch's fake process group and goes through the set-up training
uses (``build.py``: validation, device mesh, meta-device model, the family's parallelize plan), so the layout errors
a launch would hit (degrees vs. world size, divisibility, unsupported parallelisms) show up in seconds on a login
node. Memory per rank (rank 0 holds the largest shards) is then:

* parameters, gradients, optimizer state: from the sharded (DTensor local) parameter shapes;
* FSDP buffers: the largest unit gathered, one more prefetched, and its gradients before reduce-scatter;
* activations: the model family's analytic model (``TrainSpec.activation_estimator``, see
  ``tools/activation_memory.py``), checked against the tensors autograd saves on CPU (the dry-run tests); no
  torch.compile fusion is assumed, so it errs high;
* a runtime reserve of 10 % of the device (HIP/CUDA context, RCCL buffers, allocator fragmentation).

Gradients are freed before each step's forward (``zero_grad(set_to_none=True)``) and FSDP's sharded gradients
appear as backward proceeds, while activations are freed: the peak is at the start of backward (buffers and
activations) or at the optimizer step (gradients), whichever is larger (:func:`peak_bytes`), unless gradient
accumulation keeps the earlier microbatches' gradients through the later backwards. The small CPU runs of
``tests/integration/test_planner.py`` hold this against the live tensors torch's MemTracker sees.

Under pipeline parallelism every stage is built (on meta) and each pipeline rank is sized with its own stages'
shards and activations: its blocks, the head on the last stage, and the microbatches its schedule keeps in flight
(``tools/activation_memory.in_flight_microbatches``); the report is the fullest pipeline rank's, with a line per rank.

It touches no data, creates no dump folder and needs no GPU.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from torchtitan_hyena import build
from torchtitan_hyena.config import JobConfig
from torchtitan_hyena.distributed.float8 import Accelerator
from torchtitan_hyena.distributed.pipeline_parallel import stage_ids
from torchtitan_hyena.dtypes import DTYPES
from torchtitan_hyena.errors import ConfigError
from torchtitan_hyena.tools.activation_memory import ActivationEstimate, ActivationInputs, in_flight_microbatches
from torchtitan_hyena.tools.logging import init_logger, logger
from torchtitan_hyena.tools.world_size import required_world_size

GIB = 2**30
# Device memory as the driver reports it (rocm-smi / nvidia-smi MiB): one MI250X GCD, MI300X, H100 80GB, H200 141GB.
DEVICE_MEMORY_GIB = {"mi250x": 65520 / 1024, "mi300x": 196592 / 1024, "h100": 81559 / 1024, "h200": 143771 / 1024}
# What the float8 gate sees for each target: the dry run judges the device the job will run on.
TARGET_ACCELERATORS = {
    "mi250x": Accelerator("rocm", "AMD Instinct MI250X", gfx_arch="gfx90a"),
    "mi300x": Accelerator("rocm", "AMD Instinct MI300X", gfx_arch="gfx942"),
    "h100": Accelerator("cuda", "NVIDIA H100", capability=(9, 0)),
    "h200": Accelerator("cuda", "NVIDIA H200", capability=(9, 0)),
}
RESERVE_FRACTION = 0.10
OPTIMIZER_STATES = {"AdamW": 2, "Adam": 2}  # state tensors per parameter, in the parameter's dtype

HELP = """top-level flags (not config keys):
  --dry_run            build the mesh, meta model and parallelize plan for --world_size ranks in this one process
                       (fake process group), print per-rank memory and a verdict; touches no data or dump folder
  --check              run every check training runs before it starts (config, layout for --world_size ranks,
                       model, output folders, the checkpoint to seed from) in this one process, then exit; what
                       run_train.sh and the Frontier job scripts run before launching
  --world_size N       world size for --dry_run/--check (default: the product of the config's parallel degrees)
  --device NAME|GiB    --dry_run: memory budget for the verdict: mi250x (one GCD, default), mi300x, h100, h200,
                       or a number of GiB; --check: the device to judge (default: this machine's)"""


# ---------------------------------------------------------------------------------------------- flags
@dataclass
class DryRunFlags:
    world_size: int | None = None
    device: str | None = None  # None: mi250x for --dry_run, this machine for --check
    check: bool = False  # --check instead of --dry_run


def split_flags(argv: list[str]) -> tuple[list[str], DryRunFlags | None]:
    """Take ``--dry_run``/``--check``, ``--world_size N`` and ``--device D`` out of ``argv`` (the rest are config
    options)."""
    rest: list[str] = []
    flags, dry = DryRunFlags(), False
    seen: set[str] = set()
    i = 0
    while i < len(argv):
        name, eq, value = argv[i].partition("=")
        if name not in ("--dry_run", "--check", "--world_size", "--device"):
            rest.append(argv[i])
            i += 1
            continue
        seen.add(name)
        if name in ("--dry_run", "--check"):
            if eq:
                raise ConfigError(f"{name} takes no value")
            if {"--dry_run", "--check"} <= seen:
                raise ConfigError("--dry_run and --check are alternatives; give one")
            dry, flags.check = True, name == "--check"
            i += 1
            continue
        if not eq:
            if i + 1 >= len(argv):
                raise ConfigError(f"{name} needs a value")
            value = argv[i + 1]
            i += 1
        i += 1
        if name == "--world_size":
            if not value.isdigit() or int(value) < 1:
                raise ConfigError(f"--world_size expects a positive integer, got {value!r}")
            flags.world_size = int(value)
        else:
            device_budget_gib(value)  # validate now
            flags.device = value
    if not dry:
        if seen:
            raise ConfigError(f"{', '.join(sorted(seen))} only apply with --dry_run or --check")
        return rest, None
    return rest, flags


def target_accelerator(device: str) -> Accelerator:
    """What the float8 gate sees for a dry-run ``--device`` (a named GPU, or an unknown one given as GiB)."""
    return TARGET_ACCELERATORS.get(device.lower(), Accelerator("unknown", device))


def device_budget_gib(device: str) -> float:
    if device.lower() in DEVICE_MEMORY_GIB:
        return DEVICE_MEMORY_GIB[device.lower()]
    try:
        gib = float(device)
    except ValueError:
        gib = -1.0
    if gib <= 0:
        raise ConfigError(f"--device must be one of {', '.join(DEVICE_MEMORY_GIB)} or a number of GiB, got {device!r}")
    return gib


# ---------------------------------------------------------------------------------------------- report
@dataclass
class MemoryReport:
    config_file: str
    world_size: int
    mesh: dict[str, int]
    model: str
    nparams: int
    trainable_params: int | None  # LoRA: only these have gradients and optimizer state (None: every parameter)
    param_bytes: int
    grad_bytes: int
    optimizer_bytes: int
    fsdp_buffer_bytes: int
    activations: ActivationEstimate | None
    offloaded: bool  # parameters, gradients and optimizer state live in host memory
    device: str
    device_bytes: int
    pipeline_totals: tuple[int, ...] = ()  # total bytes of each pipeline rank (the report is the fullest one's)
    grads_in_peak: bool = False  # gradient accumulation: earlier microbatches' gradients live through backward

    @property
    def reserve_bytes(self) -> int:
        return int(RESERVE_FRACTION * self.device_bytes)

    @property
    def total_bytes(self) -> int:
        act = self.activations.peak if self.activations is not None else 0
        return peak_bytes(
            self.param_bytes, self.grad_bytes, self.optimizer_bytes, self.fsdp_buffer_bytes + act,
            grads_in_peak=self.grads_in_peak, offloaded=self.offloaded,
        ) + self.reserve_bytes  # fmt: skip

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.device_bytes

    def table(self) -> str:
        from tabulate import tabulate

        where = " (host)" if self.offloaded else ""
        act = self.activations
        rows = [
            [f"parameters{where}", self.param_bytes],
            [f"gradients{where}", self.grad_bytes],
            [f"optimizer state{where}", self.optimizer_bytes],
            ["FSDP gather/reduce buffers", self.fsdp_buffer_bytes],
            ["activations saved by forward (in the peak)", act.saved if act else None],
            ["activations at their peak (backward)", act.peak if act else None],
            [
                "peak: parameters + optimizer + "
                + (
                    "gradients + buffers + activations"
                    if self.grads_in_peak
                    else "max(gradients, buffers + activations)"
                ),
                self.total_bytes - self.reserve_bytes,
            ],
            [f"runtime reserve ({RESERVE_FRACTION:.0%} of device)", self.reserve_bytes],
            ["total on device", self.total_bytes],
        ]
        body = tabulate(
            [[name, "unknown" if b is None else f"{b / GIB:.2f}"] for name, b in rows],
            headers=["per rank (rank 0)", "GiB"],
            tablefmt="simple",
            colalign=("left", "right"),
            disable_numparse=True,
        )
        if self.pipeline_totals:
            totals = ", ".join(f"{b / GIB:.1f}" for b in self.pipeline_totals)
            body += f"\npipeline ranks 0..{len(self.pipeline_totals) - 1}, total GiB: {totals} (the table: the fullest)"
        mesh = " x ".join(f"{k} {v}" for k, v in self.mesh.items())
        trained = "" if self.trainable_params is None else f" ({self.trainable_params:,} trainable, LoRA)"
        verdict = "FITS" if self.fits else "DOES NOT FIT"
        if act is None:
            verdict += " (without activations: no activation model for this family)"
        return (
            f"dry run of {self.config_file} on {self.world_size} ranks ({mesh}): {self.model}, "
            f"{self.nparams / 1e9:.2f}B parameters{trained}\n{body}\n"
            f"verdict: {verdict}: {self.total_bytes / GIB:.1f} of {self.device_bytes / GIB:.1f} GiB on {self.device}"
        )


def _local_bytes(p: torch.Tensor) -> int:
    local = p.to_local() if isinstance(p, DTensor) else p
    return local.numel() * local.element_size()


def _fsdp_unit_numels(model: nn.Module, fsdp_degree: int) -> list[int]:
    """Elements of each FSDP unit once gathered over the FSDP dimension (still TP-sharded)."""
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    nested: dict[int, set[int]] = {}
    for unit in units:
        inner = [u for u in unit.modules() if isinstance(u, FSDPModule) and u is not unit]
        nested[id(unit)] = {id(p) for u in inner for p in u.parameters()}
    sizes = []
    for unit in units:
        own = [p for p in unit.parameters() if id(p) not in nested[id(unit)]]
        local = sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in own)
        sizes.append(local * fsdp_degree)
    return sizes


def dry_run(config: JobConfig, world_size: int | None = None, device: str = "mi250x") -> MemoryReport:
    """Build everything training builds up to materialization, as rank 0 of ``world_size``; see module doc."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    init_logger()
    if dist.is_initialized():
        raise RuntimeError("a dry run needs a process without a process group")
    world_size = world_size or required_world_size(config)
    device_budget_gib(device)  # a bad --device fails before the process group
    c = config
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    try:
        s = build.setup(c, target=target_accelerator(device))
        pd = s.parallel_dims
        parts, nparams, _, _ = build.build_model(s, materialize=False, all_stages=True)
        trainable = sum(q.numel() for part in parts for q in part.parameters() if q.requires_grad)
        reports = [
            _rank_report(s, [parts[i] for i in stage_ids(r, pd.pp, len(parts))], r, len(parts), nparams, device)
            for r in range(pd.pp)
        ]
        report = max(reports, key=lambda r: r.total_bytes)
        if c.lora.enable:
            report = dataclasses.replace(report, trainable_params=trainable)
        if pd.pp_enabled:
            report = dataclasses.replace(report, pipeline_totals=tuple(r.total_bytes for r in reports))
    finally:
        dist.destroy_process_group()
    return report


def peak_bytes(params: int, grads: int, optimizer: int, transient: int, *, grads_in_peak: bool, offloaded: bool) -> int:
    """Peak bytes without the reserve: parameters and optimizer state always; gradients and the backward's
    ``transient`` bytes (FSDP buffers + activations) together only when gradient accumulation keeps gradients
    through a backward, otherwise the larger of the two (see module doc). Offloaded state lives on the host."""
    if offloaded:
        return transient
    if grads_in_peak:
        return params + optimizer + grads + transient
    return params + optimizer + max(grads, transient)


def fsdp_buffer_bytes(c: JobConfig, units: list[int]) -> int:
    """FSDP's gather/reduce buffers from the gathered sizes of the rank's units: the largest unit gathered, one
    more prefetched, and its gradients before reduce-scatter; with resharding off, every unit stays gathered. Under
    pipeline parallelism the schedule reduces gradients once, after the last microbatch (when the activations are
    gone), so every unit's unsharded gradients accumulate until then, next to its parameters, gathered for the step
    ("default" means no resharding there) or one unit at a time ("always")."""
    if not units:
        return 0
    p = c.parallelism
    gathered, reduce = DTYPES[c.training.mixed_precision_param].itemsize, 4
    if p.pipeline_parallel_degree > 1:
        params = max(units) * 2 * gathered if p.fsdp_reshard_after_forward == "always" else sum(units) * gathered
        return params + sum(units) * gathered
    if p.fsdp_reshard_after_forward == "never":
        return sum(units) * gathered + max(units) * (gathered + reduce)
    return max(units) * (2 * gathered + gathered + reduce)


def activation_inputs(c: JobConfig, pp_rank: int, blocks: tuple[int, ...], n_stages: int) -> ActivationInputs:
    """What the family's activation model needs for pipeline rank ``pp_rank`` holding ``blocks`` of the model."""
    p, t, ac = c.parallelism, c.training, c.activation_checkpoint
    pp, microbatch, pipeline = p.pipeline_parallel_degree, t.local_batch_size, {}
    if pp > 1:
        microbatch = p.pipeline_parallel_microbatch_size
        pipeline = dict(
            blocks=blocks,
            head=pp_rank == (n_stages - 1) % pp,
            in_flight=in_flight_microbatches(
                p.pipeline_parallel_schedule, pp_rank, pp, t.local_batch_size // microbatch, n_stages // pp
            ),
        )
    return ActivationInputs(
        microbatch=microbatch,
        seq_len=t.seq_len,
        tp=p.tensor_parallel_degree,
        cp=p.context_parallel_degree,
        act_bytes=DTYPES[t.mixed_precision_param].itemsize,
        ac_mode=ac.mode,
        ac_option=ac.selective_ac_option,
        loss_parallel=p.tensor_parallel_degree > 1 and p.enable_loss_parallel,
        cp_rotate=p.context_parallel_rotate_method,
        cp_mr_method=p.context_parallel_mr_method,
        **pipeline,
    )


def _rank_report(
    s: build.Setup, parts: list[nn.Module], pp_rank: int, n_stages: int, nparams: int, device: str
) -> MemoryReport:
    """The memory of the (first) rank of pipeline rank ``pp_rank``, which holds ``parts`` (the whole model without
    pipeline parallelism)."""
    c, pd = s.config, s.parallel_dims
    param_bytes = sum(_local_bytes(q) for part in parts for q in part.parameters())
    trained_bytes = sum(_local_bytes(q) for part in parts for q in part.parameters() if q.requires_grad)  # LoRA
    units = [n for part in parts for n in _fsdp_unit_numels(part, pd.dp_shard * pd.cp)]
    buffers = fsdp_buffer_bytes(c, units)
    activations = None
    estimator = s.spec.activation_estimator
    if estimator is not None:
        blocks = tuple(int(n) for part in parts for n in part.layers)
        activations = estimator(s.model_args, activation_inputs(c, pp_rank, blocks, n_stages))
    elif pp_rank == 0:
        logger.warning(f"no activation model for {c.model.name}; the verdict covers everything else")
    mesh = pd.world_mesh
    return MemoryReport(
        config_file=c.job.config_file or "(defaults)",
        world_size=dist.get_world_size(),
        mesh=dict(zip(mesh.mesh_dim_names or (), mesh.shape)),
        model=f"{c.model.name} {c.model.flavor}",
        nparams=nparams,
        trainable_params=None,
        param_bytes=param_bytes,
        grad_bytes=trained_bytes,
        optimizer_bytes=OPTIMIZER_STATES.get(c.optimizer.name, 2) * trained_bytes,
        fsdp_buffer_bytes=buffers,
        activations=activations,
        offloaded=c.training.enable_cpu_offload,
        grads_in_peak=s.global_batch > c.training.local_batch_size * pd.dp_degree,
        device=device,
        device_bytes=int(device_budget_gib(device) * GIB),
    )


def run(config: JobConfig, flags: DryRunFlags) -> MemoryReport:
    """CLI entry: print the report; a layout that cannot fit is a one-line ConfigError naming the fixes."""
    report = dry_run(config, flags.world_size, flags.device or "mi250x")
    print(report.table(), flush=True)
    if not report.fits:
        raise ConfigError(
            f"{report.config_file} needs ~{report.total_bytes / GIB:.1f} GiB per rank on {report.world_size} ranks "
            f"but a {report.device} has {report.device_bytes / GIB:.1f} GiB; raise tensor/context parallel degrees, "
            "use activation_checkpoint.mode full, or lower training.local_batch_size"
        )
    return report
