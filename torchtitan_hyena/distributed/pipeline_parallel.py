"""Pipeline parallelism through ``torch.distributed.pipelining`` (TorchTitan's approach, our code).

The model's blocks are cut into consecutive stages; stage ``s`` runs on pipeline rank ``s % pp`` (one stage per
rank, or several with the looped ``Interleaved1F1B`` schedule). The first stage holds the embedding, the last the
final norm and head (and, with tied embeddings, its own copy of the embedding, whose gradient the two stages sum).
Each stage is an ordinary copy of the model with the other stages' modules removed, so parameter names (and so
checkpoints) are those of the whole model: a run resumes with or without pipeline parallelism.

A family says what its stages need through a :class:`PipelinePlan` (in its ``ParallelizePlan``); the split is given
(``pipeline_parallel_split_points`` / ``pipeline_parallel_layers_per_stage``) or balanced by the training FLOPs of
each block (``BaseModelArgs.layer_flops``; the head counts on the last stage), which matters for the hybrid, whose
attention and Hyena blocks differ in cost.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import PipelineScheduleMulti, get_schedule_class
from torch.distributed.tensor import DTensor

from torchtitan_hyena.config.job_config import Parallelism
from torchtitan_hyena.errors import ConfigError

LOOPED = frozenset({"Interleaved1F1B"})  # schedules that run several stages per rank
STAGES_PER_RANK_LOOPED = 2  # TorchTitan's default for looped schedules without an explicit split


def _no_tied(model: nn.Module) -> tuple[str, ...]:
    return ()


@dataclass(frozen=True)
class PipelinePlan:
    """What a family's stages hold. The blocks are ``model.layers`` (a ModuleDict "0".."n-1"); ``first`` / ``last``
    name the top-level modules of the first / last stage only (the others get None, which the model's forward
    skips); ``tied(model)`` names modules the last stage needs as well (tied weights): it keeps a copy and the two
    copies' gradients are summed before the optimizer step, so they stay equal."""

    first: tuple[str, ...] = ("tok_embeddings",)
    last: tuple[str, ...] = ("norm", "output")
    tied: Callable[[nn.Module], tuple[str, ...]] = _no_tied


# ---------------------------------------------------------------------------------------------- the split
def stage_count(p: Parallelism, n_layers: int) -> int:
    """Stages of the layout (``pp`` times the stages per rank)."""
    if p.pipeline_parallel_split_points:
        return len(p.pipeline_parallel_split_points) + 1
    if p.pipeline_parallel_layers_per_stage > 0:
        return math.ceil(n_layers / p.pipeline_parallel_layers_per_stage)
    per_rank = STAGES_PER_RANK_LOOPED if p.pipeline_parallel_schedule in LOOPED else 1
    return p.pipeline_parallel_degree * per_rank


def validate_pipeline(p: Parallelism, n_layers: int, local_batch_size: int, validation_batch: int = 0) -> None:
    """Pipeline layouts that cannot run, each a one-line :class:`ConfigError` (before anything is built).
    ``validation_batch``: ``validation.local_batch_size`` when validation is on (-1: the training batch), else 0."""
    pp, schedule, mbs = p.pipeline_parallel_degree, p.pipeline_parallel_schedule, p.pipeline_parallel_microbatch_size
    if pp == 1:
        return
    if validation_batch != 0 and not hasattr(get_schedule_class(schedule), "eval"):
        raise ConfigError(
            f"validation under pipeline parallelism needs torch's schedule.eval (torch {torch.__version__} lacks it); "
            "set validation.enable false or use a newer torch"
        )
    if validation_batch not in (0, -1, local_batch_size):
        raise ConfigError(
            f"validation.local_batch_size {validation_batch} differs from training.local_batch_size "
            f"{local_batch_size}; under pipeline parallelism validation runs the training schedule's microbatches, "
            "so set validation.local_batch_size -1"
        )
    if p.pipeline_parallel_split_points and p.pipeline_parallel_layers_per_stage > 0:
        raise ConfigError(
            "parallelism.pipeline_parallel_split_points and pipeline_parallel_layers_per_stage both set the split; "
            "set only one"
        )
    if p.pipeline_parallel_layers_per_stage == 0 or p.pipeline_parallel_layers_per_stage < -1:
        raise ConfigError(
            f"parallelism.pipeline_parallel_layers_per_stage must be -1 (balanced) or positive, got "
            f"{p.pipeline_parallel_layers_per_stage}"
        )
    if local_batch_size % mbs:
        raise ConfigError(
            f"parallelism.pipeline_parallel_microbatch_size {mbs} must divide training.local_batch_size "
            f"{local_batch_size}"
        )
    microbatches = local_batch_size // mbs
    if schedule != "GPipe" and microbatches < pp:
        raise ConfigError(
            f"parallelism.pipeline_parallel_schedule {schedule} needs at least pipeline_parallel_degree ({pp}) "
            f"microbatches, got {microbatches} (local_batch_size {local_batch_size} / microbatch_size {mbs}); "
            "raise local_batch_size, lower the microbatch size or use GPipe"
        )
    if schedule in LOOPED and microbatches % pp:
        raise ConfigError(
            f"parallelism.pipeline_parallel_schedule {schedule} needs a number of microbatches that is a multiple "
            f"of pipeline_parallel_degree {pp}, got {microbatches}; adjust local_batch_size or the microbatch size"
        )
    for point in p.pipeline_parallel_split_points:
        if not (point.startswith("layers.") and point[7:].isdigit()):
            raise ConfigError(
                f"parallelism.pipeline_parallel_split_points entry {point!r} is not a block name; use 'layers.N'"
            )
    starts = [int(point[7:]) for point in p.pipeline_parallel_split_points]
    if starts != sorted(set(starts)) or (starts and not 0 < starts[0] <= starts[-1] < n_layers):
        raise ConfigError(
            f"parallelism.pipeline_parallel_split_points {p.pipeline_parallel_split_points} must be increasing "
            f"blocks between layers.1 and layers.{n_layers - 1}"
        )
    stages = stage_count(p, n_layers)
    per_rank = stages // pp
    if stages % pp or (schedule not in LOOPED and per_rank != 1) or (schedule in LOOPED and per_rank < 2):
        want = f"{pp} (one per rank)" if schedule not in LOOPED else f"a multiple of {pp}, at least {2 * pp}"
        raise ConfigError(
            f"the pipeline split gives {stages} stages but schedule {schedule} with pipeline_parallel_degree {pp} "
            f"needs {want}; change pipeline_parallel_split_points / pipeline_parallel_layers_per_stage or the schedule"
        )
    if n_layers < stages:
        raise ConfigError(
            f"the model has {n_layers} blocks, fewer than the {stages} pipeline stages; lower "
            "pipeline_parallel_degree (or the stages per rank)"
        )


def balanced_ranges(costs: Sequence[float], stages: int, head_cost: float = 0.0) -> list[tuple[int, int]]:
    """Consecutive block ranges [start, stop) for ``stages`` non-empty stages that minimize the costliest stage
    (the last stage also pays ``head_cost``); exact, by dynamic programming over (blocks, stages)."""
    n = len(costs)
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    # best[s][i]: the smallest possible maximum over the first s stages holding blocks [0, i)
    best = [[inf] * (n + 1) for _ in range(stages + 1)]
    cut = [[0] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = 0.0
    for s in range(1, stages + 1):
        for i in range(s, n - (stages - s) + 1):
            extra = head_cost if s == stages else 0.0
            for j in range(s - 1, i):
                value = max(best[s - 1][j], prefix[i] - prefix[j] + extra)
                if value < best[s][i]:
                    best[s][i], cut[s][i] = value, j
    ranges, i = [], n
    for s in range(stages, 0, -1):
        ranges.append((cut[s][i], i))
        i = cut[s][i]
    return ranges[::-1]


def stage_ranges(p: Parallelism, costs: Sequence[float], head_cost: float) -> list[tuple[int, int]]:
    """Each stage's blocks [start, stop): from the split points, the layers per stage, or balanced by cost."""
    n = len(costs)
    if p.pipeline_parallel_split_points:
        starts = [0, *(int(point[7:]) for point in p.pipeline_parallel_split_points), n]
        return list(zip(starts[:-1], starts[1:]))
    if p.pipeline_parallel_layers_per_stage > 0:
        k = p.pipeline_parallel_layers_per_stage
        return [(i, min(i + k, n)) for i in range(0, n, k)]
    return balanced_ranges(costs, stage_count(p, n), head_cost)


def stage_ids(pp_rank: int, pp: int, stages: int) -> list[int]:
    """The stages of pipeline rank ``pp_rank``: ``pp_rank``, ``pp_rank + pp``, ... (looped placement)."""
    return list(range(pp_rank, stages, pp))


def split_stage(model: nn.Module, plan: PipelinePlan, ranges: list[tuple[int, int]], stage: int) -> nn.Module:
    """A copy of the (meta) ``model`` holding stage ``stage``'s blocks and the first/last modules it needs."""
    first, last = stage == 0, stage == len(ranges) - 1
    part = copy.deepcopy(model)
    start, stop = ranges[stage]
    for name in list(part.layers):
        if not start <= int(name) < stop:
            del part.layers[name]
    keep = set(plan.tied(model)) if last else set()
    for name in plan.first:
        if not first and name not in keep:
            setattr(part, name, None)
    for name in plan.last:
        if not last:
            setattr(part, name, None)
    return part


def head_cost(model: nn.Module, plan: PipelinePlan) -> float:
    """Training FLOPs per token of the last stage's extra modules: 6 per weight (forward and backward matmuls)."""
    names = [*plan.last, *plan.tied(model)]
    modules = [getattr(model, n) for n in names if getattr(model, n, None) is not None]
    return 6.0 * sum(p.numel() for m in modules for p in m.parameters() if p.dim() > 1)


# ---------------------------------------------------------------------------------------------- running
LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


class Pipeline:
    """This rank's stages and their schedule. :meth:`step` runs forward and backward of one batch; the loss is
    computed on the last stage, per microbatch, as ``loss_fn(logits, labels, weights) / divisor``."""

    def __init__(
        self,
        parts: list[nn.Module],
        stages: list[int],
        n_stages: int,
        tied_names: tuple[str, ...],
        p: Parallelism,
        local_batch_size: int,
        pp_group: dist.ProcessGroup,
        tied_group: dist.ProcessGroup | None,
        device: torch.device,
    ) -> None:
        self.has_first, self.has_last = 0 in stages, n_stages - 1 in stages
        pipeline_stages = [PipelineStage(part, s, n_stages, device, group=pp_group) for part, s in zip(parts, stages)]
        schedule_cls = get_schedule_class(p.pipeline_parallel_schedule)
        looped = issubclass(schedule_cls, PipelineScheduleMulti)
        self.schedule = schedule_cls(
            pipeline_stages if looped else pipeline_stages[0],
            n_microbatches=local_batch_size // p.pipeline_parallel_microbatch_size,
            loss_fn=self._loss,
            scale_grads=False,  # the loss is already a share of the global token sum
        )
        # Tied weights (``PipelinePlan.tied`` of the whole model), held by the first and the last stage.
        self.tied_group = tied_group
        self.tied = [
            q for part, s in zip(parts, stages) if s in (0, n_stages - 1) for n in tied_names
            for q in getattr(part, n).parameters()
        ]  # fmt: skip
        self._loss_fn: LossFn | None = None
        self._divisor: torch.Tensor | None = None

    def _loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        # A float target carries (labels, loss weights) stacked on a last dimension: the schedule splits one tensor.
        if target.is_floating_point():
            labels, weights = target[..., 0].long(), target[..., 1].float()
        else:
            labels, weights = target, None
        return self._loss_fn(logits, labels, weights) / self._divisor

    def step(self, batch: dict[str, torch.Tensor], loss_fn: LossFn, divisor: torch.Tensor) -> torch.Tensor:
        """Forward and backward of one (prepared) batch; the sum of its microbatch losses on the last stage,
        zero elsewhere (summed over the pipeline ranks by the caller)."""
        return self._run(self.schedule.step, batch, loss_fn, divisor)

    def evaluate(self, batch: dict[str, torch.Tensor], loss_fn: LossFn) -> torch.Tensor:
        """Forward only (validation) of one batch of ``local_batch_size`` sequences: the summed loss on the last
        stage, zero elsewhere."""
        return self._run(self.schedule.eval, batch, loss_fn, torch.ones((), device=batch["input"].device))

    def _run(self, run: Callable[..., object], batch: dict[str, torch.Tensor], loss_fn: LossFn, divisor: torch.Tensor):
        self._loss_fn, self._divisor = loss_fn, divisor
        tokens, labels = batch["input"], batch["labels"]
        target = labels
        if batch.get("loss_weights") is not None:
            target = torch.stack((labels.double(), batch["loss_weights"].double()), dim=-1)
        positions = batch.get("positions")
        if positions is None:
            positions = torch.arange(tokens.shape[1], device=tokens.device)
        # Every stage needs the global positions (RoPE) of its tokens; per row, so the schedule can split them.
        kwargs = {"positions": positions.expand(tokens.shape[0], -1)}
        losses: list[torch.Tensor] = []
        args = (tokens,) if self.has_first else ()
        run(*args, target=target if self.has_last else None, losses=losses, **kwargs)
        total = torch.zeros((), dtype=torch.float64, device=tokens.device)
        for loss in losses:
            total += loss.detach().to(torch.float64)
        return total

    def sync_tied_grads(self) -> None:
        """Sum the gradients of the tied copies (first and last stage) so both take the same optimizer step."""
        for param in self.tied:
            if param.grad is None:
                continue
            grad = param.grad.to_local() if isinstance(param.grad, DTensor) else param.grad
            dist.all_reduce(grad, group=self.tied_group)  # in place: to_local() shares the gradient's storage

    def counted_elsewhere(self) -> frozenset[int]:
        """Tied copies on the last stage: the first stage counts their gradient in the norm."""
        return frozenset(id(q) for q in self.tied) if self.has_last and not self.has_first else frozenset()


def tied_group(world_mesh: DeviceMesh, pp: int) -> dist.ProcessGroup:
    """This rank's group of the first and the last pipeline rank at its other mesh coordinates (every rank creates
    every such group, in the same order, as ``new_group`` requires). ``pp`` is the outermost mesh dimension."""
    ranks = world_mesh.mesh.reshape(pp, -1)
    me, mine = dist.get_rank(), None
    for j in range(ranks.shape[1]):
        pair = [int(ranks[0, j]), int(ranks[-1, j])]
        group = dist.new_group(pair)
        if me in pair:
            mine = group
    return mine
