"""Full-scale dry run: the real mesh, model and parallelize plan in one process, and a memory verdict.

    python -m torchtitan_hyena.train --job.config_file X.toml --dry_run --world_size 512 [--device mi250x]

One process plays rank 0 of ``world_size`` on torch's fake process group. The device mesh, the
meta-device model and ``train_spec.parallelize_fn`` are the ones training uses, so the layout errors a
launch would hit (degrees vs. world size, divisibility, unsupported parallelisms) show up in seconds
on a login node. Memory per rank (rank 0 holds the largest shards) is then:

* parameters, gradients, optimizer state: from the sharded (DTensor local) parameter shapes;
* FSDP buffers: the largest unit gathered, one more prefetched, and its gradients before reduce-scatter;
* activations: an analytic model per model family, checked against the tensors autograd saves on CPU
  (tests/test_dry_run.py); no torch.compile fusion is assumed, so it errs high;
* a runtime reserve of 10 % of the device (HIP/CUDA context, RCCL buffers, allocator fragmentation).

It touches no data, creates no dump folder and needs no GPU.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from torchtitan_hyena.config import JobConfig
from torchtitan_hyena.distributed.float8 import Accelerator
from torchtitan_hyena.distributed.fsdp import DTYPES
from torchtitan_hyena.distributed.parallel_dims import ParallelDims
from torchtitan_hyena.errors import ConfigError
from torchtitan_hyena.protocols.model import BaseModelArgs
from torchtitan_hyena.protocols.train_spec import get_flavor_args, get_train_spec
from torchtitan_hyena.tools.logging import init_logger, logger
from torchtitan_hyena.tools.world_size import required_world_size

GIB = 2**30
# Device memory as the driver reports it (rocm-smi / nvidia-smi MiB): one MI250X GCD, H100 80GB, H200 141GB.
DEVICE_MEMORY_GIB = {"mi250x": 65520 / 1024, "h100": 81559 / 1024, "h200": 143771 / 1024}
# What the float8 gate sees for each target: the dry run judges the device the job will run on.
TARGET_ACCELERATORS = {
    "mi250x": Accelerator("rocm", "AMD Instinct MI250X", gfx_arch="gfx90a"),
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
  --device NAME|GiB    --dry_run: memory budget for the verdict: mi250x (one GCD, default), h100, h200, or a number
                       of GiB; --check: the device to judge (default: this machine's)"""


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


# ---------------------------------------------------------------------------------------------- activations
@dataclass(frozen=True)
class ActivationInputs:
    """What one rank's activation memory depends on, besides the model's shape."""

    microbatch: int  # sequences per forward/backward
    seq_len: int  # global sequence length
    tp: int
    cp: int
    act_bytes: int  # bytes per activation element (the compute dtype)
    ac_mode: str
    ac_option: str
    loss_parallel: bool
    cp_rotate: str = "allgather"  # allgather keeps the whole sequence's K/V per attention layer, ring one block


@dataclass(frozen=True)
class ActivationEstimate:
    saved: int  # tensors autograd keeps from forward to backward (all layers + head), at the end of forward
    peak: int  # the most alive at once: the layers' saved tensors plus the loss, or plus a recomputed block


ActivationEstimator = Callable[[BaseModelArgs, ActivationInputs], ActivationEstimate]
_ESTIMATORS: dict[str, ActivationEstimator] = {}


def register_activation_estimator(model_name: str, estimator: ActivationEstimator) -> None:
    """Teach the dry run the activation memory of a model family."""
    _ESTIMATORS[model_name] = estimator


def _norm_bytes(h: int) -> float:
    return 2 * 4 * h + 4  # RMSNorm keeps its input and normalised output in fp32, plus rstd


def _with_checkpointing(
    s: ActivationInputs, layers: list[tuple[float, float]], block_input: float, head_saved: float, vocab: float, f: int
) -> ActivationEstimate:
    """Combine per-layer bytes per token, ``(full, kept by per-op SAC)``, according to the AC mode, add the head,
    and find the peak: the saved tensors plus the loss, or plus one recomputed block and its live gradients."""
    t, p, h = s.tp, s.act_bytes, block_input * s.tp / s.act_bytes
    tokens = s.microbatch * s.seq_len // s.cp
    worst = max(full for full, _ in layers)
    if s.ac_mode == "none":
        per_layer, recompute = sum(full for full, _ in layers), 0.0
    elif s.ac_mode == "full":
        per_layer, recompute = len(layers) * block_input, worst
    elif s.ac_option == "op":
        per_layer, recompute = sum(op for _, op in layers), worst
    else:
        every = int(s.ac_option)
        per_layer = sum(block_input if i % every == 0 else full for i, (full, _) in enumerate(layers))
        recompute = worst
    head_transient = (p + 4 + 4) * vocab  # logits, their fp32 copy, its gradient
    block_transient = recompute + p * (2 * f / t + 2 * h)  # recomputed block, live gradients
    # The head's tensors are freed by the time the last block's backward (and recompute) starts.
    peak = per_layer + max(head_saved + head_transient, block_transient)
    return ActivationEstimate(saved=int(tokens * (per_layer + head_saved)), peak=int(tokens * peak))


def llama3_activations(args: BaseModelArgs, s: ActivationInputs) -> ActivationEstimate:
    """Bytes autograd saves per token and layer, for eager Llama 3 blocks (no compile fusion).

    Under TP the residual stream and the norms are sequence-sharded (SP) while the inputs of the
    column-parallel projections are gathered; under CP each rank holds seq_len / cp tokens, and all-gather
    attention keeps the gathered K/V of the whole sequence (ring attention only its own).
    """
    t, p = s.tp, s.act_bytes
    cp = s.cp if s.cp_rotate == "allgather" else 1
    h, f, heads = args.dim, args.ffn_hidden_dim, args.n_heads
    q, kv = heads * args.head_dim, args.kv_heads * args.head_dim
    norm = _norm_bytes(h)
    sdpa_out = p * q / t + 4 * heads / t  # output and log-sum-exp
    block_input = p * h / t
    full = (
        2 * norm / t  # attention_norm, ffn_norm (sequence-parallel)
        + 2 * p * h  # inputs of wq/wk/wv and w1/w3, gathered over TP
        + p * (q + 2 * kv * cp) / t  # SDPA inputs: q, and K/V over the whole sequence
        + sdpa_out
        + 4 * p * f / t  # SwiGLU: w1 out, silu out, w3 out, their product
    )
    # Per-op SAC (activation_checkpoint.py) keeps every other matmul output (wq, wv, w1, w2) and attention.
    op_sac = block_input + p * (q + kv + f) / t + p * h + sdpa_out
    vocab = args.vocab_size / (t if s.loss_parallel else 1)
    head_saved = norm / t + p * h + 4 * vocab  # final norm, output input, fp32 log-softmax
    return _with_checkpointing(s, [(full, op_sac)] * args.n_layers, block_input, head_saved, vocab, f)


def hyena_activations(args: BaseModelArgs, s: ActivationInputs) -> ActivationEstimate:
    """Bytes autograd saves per token and layer, for eager StripedHyena 2 blocks (sequence parallel as Llama).

    Every block keeps two norms, the gathered inputs of its mixer and MLP and the GLU's four F-wide tensors.
    Hyena blocks add the 3D projection and the featurized q/k/v, and the SE/MR reference convolution's fp32
    k*v, output and q (the Triton kernels keep less; the LI FFT op keeps nothing beyond q/k/v); attention
    blocks keep q/k/v after RoPE and the SDPA output. The tied head's logits are whole on every rank.
    Under CP (seq_len / cp tokens per rank) all-gather attention also keeps the whole sequence's K/V, and the
    all-to-all convolutions keep the channel-sharded k*v and the returned output (one D/tp-wide tensor each per
    local token).
    """
    t, p = s.tp, s.act_bytes
    h, f, heads = args.dim, args.ffn_hidden_dim, args.n_heads
    gathered_kv = 2 * p * h * (s.cp - 1) / t if s.cp_rotate == "allgather" else 0.0
    all_to_all = 2 * p * h / t if s.cp > 1 else 0.0
    norm = _norm_bytes(h)
    block_input = p * h / t
    common = 2 * norm / t + 2 * p * h + 4 * p * f / t + p * h / t  # norms, gathered inputs, GLU, out_proj input
    sdpa_out = p * h / t + 4 * heads / t
    layers = []
    for kind in args.layout:
        if kind == "*":
            mixer, op_kept = 3 * p * h / t + gathered_kv + sdpa_out, p * 3 * h / t + gathered_kv + sdpa_out
        else:
            mixer, op_kept = 2 * 3 * p * h / t + (3 * 4 * h / t if kind in "SD" else all_to_all), p * 3 * h / t
        op_sac = block_input + op_kept + p * (f + h) / t + p * h  # every other matmul output, as for Llama
        layers.append((common + mixer, op_sac))
    vocab = args.vocab_size / (t if s.loss_parallel else 1)
    head_saved = norm / t + p * h + 4 * vocab
    return _with_checkpointing(s, layers, block_input, head_saved, vocab, f)


register_activation_estimator("llama3", llama3_activations)
register_activation_estimator("hyena", hyena_activations)


# ---------------------------------------------------------------------------------------------- report
@dataclass
class MemoryReport:
    config_file: str
    world_size: int
    mesh: dict[str, int]
    model: str
    nparams: int
    param_bytes: int
    grad_bytes: int
    optimizer_bytes: int
    fsdp_buffer_bytes: int
    activations: ActivationEstimate | None
    offloaded: bool  # parameters, gradients and optimizer state live in host memory
    device: str
    device_bytes: int

    @property
    def state_bytes(self) -> int:
        return 0 if self.offloaded else self.param_bytes + self.grad_bytes + self.optimizer_bytes

    @property
    def reserve_bytes(self) -> int:
        return int(RESERVE_FRACTION * self.device_bytes)

    @property
    def total_bytes(self) -> int:
        act = self.activations.peak if self.activations is not None else 0
        return self.state_bytes + self.fsdp_buffer_bytes + act + self.reserve_bytes

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
        mesh = " x ".join(f"{k} {v}" for k, v in self.mesh.items())
        verdict = "FITS" if self.fits else "DOES NOT FIT"
        if act is None:
            verdict += " (without activations: no activation model for this family)"
        return (
            f"dry run of {self.config_file} on {self.world_size} ranks ({mesh}): {self.model}, "
            f"{self.nparams / 1e9:.2f}B parameters\n{body}\n"
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

    from torchtitan_hyena.train import convert_model, validate_layout  # train imports this module

    init_logger()
    if dist.is_initialized():
        raise RuntimeError("a dry run needs a process without a process group")
    world_size = world_size or required_world_size(config)
    budget = int(device_budget_gib(device) * GIB)
    c, p = config, config.parallelism
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    try:
        pd = ParallelDims(
            dp_replicate=p.data_parallel_replicate_degree,
            dp_shard=p.data_parallel_shard_degree,
            cp=p.context_parallel_degree,
            tp=p.tensor_parallel_degree,
            world_size=world_size,
        )
        validate_layout(c, pd, target_accelerator(device))
        pd.build_mesh("cpu")
        spec = get_train_spec(c.model.name)
        args = get_flavor_args(spec, c.model.flavor)
        args.update_from_config(c)
        with torch.device("meta"):
            model = spec.model_cls(args)
        convert_model(model, c, pd)
        nparams, _ = args.get_nparams_and_flops(model, c.training.seq_len)
        model = spec.parallelize_fn(model, pd, c)

        param_bytes = sum(_local_bytes(q) for q in model.parameters())
        states = OPTIMIZER_STATES.get(c.optimizer.name, 2)
        fsdp_units = _fsdp_unit_numels(model, pd.dp_shard * pd.cp)
        gathered, reduce = DTYPES[c.training.mixed_precision_param].itemsize, 4
        if fsdp_units and c.parallelism.fsdp_reshard_after_forward == "never":
            buffers = sum(fsdp_units) * gathered + max(fsdp_units) * (gathered + reduce)
        elif fsdp_units:
            buffers = max(fsdp_units) * (2 * gathered + gathered + reduce)
        else:
            buffers = 0
        estimator = _ESTIMATORS.get(c.model.name)
        activations = None
        if estimator is not None:
            ac = c.activation_checkpoint
            activations = estimator(
                args,
                ActivationInputs(
                    microbatch=c.training.local_batch_size,
                    seq_len=c.training.seq_len,
                    tp=pd.tp,
                    cp=pd.cp,
                    act_bytes=DTYPES[c.training.mixed_precision_param].itemsize,
                    ac_mode=ac.mode,
                    ac_option=ac.selective_ac_option,
                    loss_parallel=pd.tp_enabled and p.enable_loss_parallel,
                    cp_rotate=p.context_parallel_rotate_method,
                ),
            )
        else:
            logger.warning(f"no activation model for {c.model.name}; the verdict covers everything else")
        mesh = pd.world_mesh
        report = MemoryReport(
            config_file=c.job.config_file or "(defaults)",
            world_size=world_size,
            mesh=dict(zip(mesh.mesh_dim_names or (), mesh.shape)),
            model=f"{c.model.name} {c.model.flavor}",
            nparams=nparams,
            param_bytes=param_bytes,
            grad_bytes=param_bytes,
            optimizer_bytes=states * param_bytes,
            fsdp_buffer_bytes=buffers,
            activations=activations,
            offloaded=c.training.enable_cpu_offload,
            device=device,
            device_bytes=budget,
        )
    finally:
        dist.destroy_process_group()
    return report


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
