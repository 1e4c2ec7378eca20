"""What the planner needs to know about a model, read once from the real build.

One meta-device build of the config's model at a small reference layout (FSDP 2 x TP 2 on torch's fake process
group, or FSDP 2 alone for a model that cannot take TP 2) goes through the family's own parallelize plan, so the
census knows, for every parameter, its global shape, which dimension tensor parallelism splits, the FSDP unit it is
gathered with and in what dtype, and the block or top-level module it belongs to. Any other layout's parameter
shards, FSDP buffers and FSDP traffic then follow by arithmetic (``memory.py``, ``traffic.py``), which the tests
hold against the dry run of that layout.
"""

from __future__ import annotations

import copy
import functools
import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, Shard

from torchtitan_hyena import build
from torchtitan_hyena.config import JobConfig
from torchtitan_hyena.config.job_config import Parallelism
from torchtitan_hyena.distributed.float8 import Accelerator
from torchtitan_hyena.distributed.pipeline_parallel import head_cost, stage_ids, stage_ranges
from torchtitan_hyena.distributed.utils import clean_fqn
from torchtitan_hyena.errors import ConfigError
from torchtitan_hyena.protocols.model import BaseModelArgs
from torchtitan_hyena.protocols.train_spec import TrainSpec


@dataclass(frozen=True)
class Param:
    fqn: str
    shape: tuple[int, ...]  # global
    tp_dim: int | None  # the dimension tensor parallelism splits (None: replicated over TP)
    unit: int  # index into Census.units
    block: int | None  # the block (``layers.N``) it belongs to; None for top-level modules
    top: str  # first FQN component (tok_embeddings, norm, output, layers, ...)
    itemsize: int  # bytes per element of the (sharded, master) parameter
    trainable: bool

    def local_numel(self, tp: int, fsdp: int) -> int:
        """Elements on the rank holding the largest shard (rank 0): TP splits ``tp_dim``, FSDP then dim 0."""
        shape = list(self.shape)
        if self.tp_dim is not None and shape:
            shape[self.tp_dim] = math.ceil(shape[self.tp_dim] / tp)
        if shape and fsdp > 1:
            shape[0] = math.ceil(shape[0] / fsdp)
        return math.prod(shape)

    def tp_numel(self, tp: int) -> int:
        """Elements after TP alone (what an FSDP all-gather assembles on each rank)."""
        shape = list(self.shape)
        if self.tp_dim is not None and shape:
            shape[self.tp_dim] = math.ceil(shape[self.tp_dim] / tp)
        return math.prod(shape)


@dataclass(frozen=True)
class Unit:
    gather_itemsize: int  # FSDP all-gathers in this dtype (the mixed-precision param dtype, or fp32 units)
    root: bool  # the root unit (everything no inner unit holds)
    last: bool  # the final norm + head unit (reshards only with fsdp_reshard_after_forward = "always")


@dataclass(frozen=True)
class Census:
    spec: TrainSpec
    model_args: BaseModelArgs
    params: tuple[Param, ...]
    units: tuple[Unit, ...]
    nparams: int
    flops_per_token: float  # training FLOPs per token of the whole model (6N + attention), for MFU
    layer_flops: tuple[float, ...]  # per block
    head_flops: float  # the last stage's extra modules
    first: tuple[str, ...]  # top-level modules on the first pipeline stage
    last: tuple[str, ...]  # ... and on the last (including tied copies)
    tied: tuple[str, ...]  # modules the first and last stage both hold (their gradients are summed)
    cache: dict = field(default_factory=dict, compare=False, repr=False)  # per-layout results the search reuses

    @property
    def n_layers(self) -> int:
        return len(self.layer_flops)

    def stage_blocks(self, config: JobConfig, pp_rank: int) -> tuple[list[int], bool, bool]:
        """(blocks, holds the first stage, holds the last stage) of pipeline rank ``pp_rank`` under ``config``."""
        p = config.parallelism
        if p.pipeline_parallel_degree == 1:
            return list(range(self.n_layers)), True, True
        split = (
            p.pipeline_parallel_schedule,
            tuple(p.pipeline_parallel_split_points),
            p.pipeline_parallel_layers_per_stage,
        )
        ranges = _ranges(self.layer_flops, self.head_flops, p.pipeline_parallel_degree, *split)
        stages = stage_ids(pp_rank, p.pipeline_parallel_degree, len(ranges))
        blocks = [b for s in stages for b in range(*ranges[s])]
        return blocks, 0 in stages, len(ranges) - 1 in stages

    def rank_params(self, config: JobConfig, pp_rank: int) -> list[Param]:
        """The parameters pipeline rank ``pp_rank`` holds."""
        blocks, first, last = self.stage_blocks(config, pp_rank)
        key = ("params", pp_rank, tuple(blocks), first, last)
        if key in self.cache:
            return self.cache[key]
        chosen, held = [], set(blocks)
        for q in self.params:
            if q.block is not None:
                keep = q.block in held
            else:
                keep = (first and q.top in self.first) or (last and q.top in self.last)
                keep = keep or q.top not in (*self.first, *self.last)
            if keep:
                chosen.append(q)
        self.cache[key] = chosen
        return chosen


@functools.lru_cache(maxsize=1024)
def _ranges(
    costs: tuple[float, ...], head: float, pp: int, schedule: str, points: tuple[str, ...], per_stage: int
) -> list[tuple[int, int]]:
    p = Parallelism(
        pipeline_parallel_degree=pp,
        pipeline_parallel_schedule=schedule,
        pipeline_parallel_split_points=list(points),
        pipeline_parallel_layers_per_stage=per_stage,
    )
    return stage_ranges(p, costs, head)


def reference_config(config: JobConfig, tp: int) -> JobConfig:
    """The config at the census layout: FSDP 2 x TP ``tp``, no CP/PP/HSDP, nothing compiled."""
    c = copy.deepcopy(config)
    p = c.parallelism
    p.data_parallel_replicate_degree, p.data_parallel_shard_degree = 1, 2
    p.tensor_parallel_degree, p.context_parallel_degree, p.pipeline_parallel_degree = tp, 1, 1
    p.enable_async_tensor_parallel = False
    p.pipeline_parallel_split_points, p.pipeline_parallel_layers_per_stage = [], -1
    c.compile.enable = False
    c.validation.enable = False
    c.activation_checkpoint.mode = "none"
    return c


def take_census(config: JobConfig, target: Accelerator) -> Census:
    """Build the model once (meta device, fake process group) and record every parameter; see module doc."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("the planner's census needs a process without a process group")
    errors = []
    for tp in (2, 1):
        c = reference_config(config, tp)
        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2 * tp)
        try:
            s = build.setup(c, target=target)
            built = build.build_model(s, materialize=False)
            return _census(s, built.model, built.nparams, built.flops_per_token)
        except ConfigError as e:  # a model that cannot take TP 2 is planned without TP
            errors.append(str(e))
        finally:
            dist.destroy_process_group()
    raise ConfigError(f"the planner cannot build {config.model.name} {config.model.flavor}: {errors[-1]}")


def _census(s: build.Setup, model: nn.Module, nparams: int, flops: float) -> Census:
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    owner: dict[int, int] = {}
    for i, unit in enumerate(units):  # modules() is pre-order: inner units come later and take their params
        for q in unit.parameters():
            owner[id(q)] = i
    plan = s.spec.parallelize_plan.pipeline
    last_unit = {
        id(q) for name in plan.last if getattr(model, name, None) is not None for q in getattr(model, name).parameters()
    }
    unit_info = []
    for i, unit in enumerate(units):
        policy = getattr(unit._get_fsdp_state(), "_mp_policy", None)  # FSDP2 has no public getter for it
        dtype = getattr(policy, "param_dtype", None) or torch.float32
        own = [q for q in unit.parameters() if owner[id(q)] == i]
        unit_info.append(
            Unit(dtype.itemsize, root=unit is model, last=bool(own) and all(id(q) in last_unit for q in own))
        )
    params = []
    for name, q in model.named_parameters():
        fqn = clean_fqn(name)
        tp_dim = None
        if isinstance(q, DTensor) and "tp" in (q.device_mesh.mesh_dim_names or ()):
            placement = q.placements[q.device_mesh.mesh_dim_names.index("tp")]
            tp_dim = placement.dim if isinstance(placement, Shard) else None
        parts = fqn.split(".")
        block = int(parts[1]) if parts[0] == "layers" else None
        params.append(
            Param(fqn, tuple(q.shape), tp_dim, owner[id(q)], block, parts[0], q.element_size(), q.requires_grad)
        )
    t = s.config.training
    return Census(
        spec=s.spec,
        model_args=s.model_args,
        params=tuple(params),
        units=tuple(unit_info),
        nparams=nparams,
        flops_per_token=flops,
        layer_flops=tuple(s.model_args.layer_flops(t.seq_len)),
        head_flops=head_cost(model, plan),
        first=tuple(plan.first),
        last=(*plan.last, *plan.tied(model)),
        tied=plan.tied(model),
    )
