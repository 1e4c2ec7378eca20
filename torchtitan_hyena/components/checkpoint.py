"""DCP checkpoints: save, resume, seed from another checkpoint, export.

Layout: ``<dump_folder>/<folder>/step-N/`` holds one DCP checkpoint (model FQNs at the top level;
``optimizer``, ``lr_scheduler``, ``dataloader`` and ``train_state`` entries), plus
``model_args.json`` and ``job_config.json``. A step folder counts only once the completion
marker ``.complete`` exists; it is written after every rank has finished writing, so a folder
left by a crash is ignored (with a warning) and never resumed from.

Background (async) saves finish at different moments on different ranks. Whether one is done is
decided by all ranks together, at a step boundary (an all-reduce of "done" flags), so every rank
finalizes at the same step and none waits in a collective that the others are not in.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint._nested_dict import flatten_state_dict
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict

from torchtitan_hyena.components import checkpoint_writer
from torchtitan_hyena.components.dcp_reader import dcp_error, load_dcp, read_dcp_metadata
from torchtitan_hyena.distributed.utils import clean_fqn
from torchtitan_hyena.dtypes import DTYPES
from torchtitan_hyena.errors import UserError
from torchtitan_hyena.protocols.model import MODEL_ARGS_FILE, read_model_args, write_model_args
from torchtitan_hyena.tools.logging import logger

COMPLETE_MARKER = ".complete"
_STEP_RE = re.compile(r"^step-(\d+)$")
NON_MODEL_STATE = ("optimizer", "lr_scheduler", "dataloader", "train_state")


def step_folders(folder: Path, complete_only: bool = True) -> dict[int, Path]:
    """{step: path} of the step folders under ``folder``."""
    found = {}
    if folder.is_dir():
        for p in folder.iterdir():
            m = _STEP_RE.match(p.name)
            if m and p.is_dir() and (not complete_only or (p / COMPLETE_MARKER).exists()):
                found[int(m.group(1))] = p
    return found


def check_model_family(path: Path, model_name: str) -> None:
    """Refuse a checkpoint whose ``model_args.json`` records another model family than the run's.

    Sharing a few names (embeddings, final norm) would otherwise "seed" a model from the wrong family and train
    the rest from fresh weights. Llama seeds a hybrid only through ``llama_to_dcp.py --target hyena``, whose
    output records the hybrid family. Checkpoints without the file (other tools' DCPs) are judged by their keys.
    """
    if not (path / MODEL_ARGS_FILE).is_file():
        return
    family, _, _ = read_model_args(path)
    if family == model_name:
        return
    hint = (
        "convert the Llama with llama_to_dcp.py --target hyena and seed from its output"
        if (family, model_name) == ("llama3", "hyena")
        else f"use it with a {family} config (model.name = {family!r}), or seed from a {model_name} checkpoint"
    )
    raise UserError(f"checkpoint {path} holds a {family!r} model but this run trains {model_name!r}; {hint}")


def model_state_dict(model_parts: list[nn.Module], trainable_only: bool = False) -> dict[str, Any]:
    """The parts' model state under plain module paths; ``trainable_only``: without the frozen weights (a LoRA
    checkpoint). DSD drops the AC wrapper's name but keeps ``_orig_mod.`` when AC wraps a compiled block (TP +
    compile + AC), and a checkpoint's names must not depend on the layout that wrote it."""
    options = StateDictOptions(ignore_frozen_params=trainable_only)
    sd: dict[str, Any] = {}
    for part in model_parts:
        sd.update({clean_fqn(k): v for k, v in get_model_state_dict(part, options=options).items()})
    return sd


# For readers whose model comes from the checkpoint's own model_args.json (score, exporters): a
# tensor that is absent there means a partial seed, not a wrong flavor.
PARTIAL_SEED_FIX = (
    "it is a partial seed (a converter output without embeddings or with fresh Hyena blocks): "
    "train from it with --checkpoint.initial_load_path, then use a training checkpoint"
)


def load_model_weights(
    model_parts: list[nn.Module],
    path: Path,
    strict_shapes: bool = True,
    fix: str = "check model.flavor and model.vocab_size",
    metadata: Metadata | None = None,
    trainable_only: bool = False,
) -> dict[str, list[str]]:
    """Load model tensors from a DCP folder into ``model_parts``, tolerating partial checkpoints.

    Keys may be plain FQNs or ``model.``-prefixed (DCPs written as ``{"model": sd}``). Parameters
    absent from the checkpoint or of a different shape keep their current (fresh) values and are
    returned, so the caller can list them. ``fix`` ends the error raised on a mismatch under
    ``strict_shapes``: what the user should change depends on where the model's shape came from.
    A partial load must still match some of the model's layers: names shared by every model
    (embeddings, final norm) alone do not make a seed. ``trainable_only``: only the trained tensors are
    expected (a LoRA checkpoint; the frozen base weights come from elsewhere).
    """
    metadata = metadata or read_dcp_metadata(path)
    meta = metadata.state_dict_metadata
    sd = model_state_dict(model_parts, trainable_only)
    legacy = {clean_fqn(k): k for k in meta if clean_fqn(k) != k}  # names written with wrapper parts (before 12/2026)
    to_load, renamed, missing, mismatched = {}, {}, [], []
    for key, value in sd.items():
        ckpt_key = next((k for k in (key, f"model.{key}") if k in meta), None)
        ckpt_key = ckpt_key or legacy.get(key) or legacy.get(f"model.{key}")
        if ckpt_key is None:
            missing.append(key)
            continue
        info = meta[ckpt_key]
        if not isinstance(info, TensorStorageMetadata) or tuple(info.size) != tuple(value.shape):
            have = tuple(info.size) if isinstance(info, TensorStorageMetadata) else "non-tensor"
            mismatched.append(f"{key} {have} -> {tuple(value.shape)}")
            continue
        to_load[ckpt_key] = value
        renamed[ckpt_key] = key
    if strict_shapes and (missing or mismatched):
        raise UserError(
            f"checkpoint {path} does not match the model: {len(missing)} missing and {len(mismatched)} "
            f"mis-shaped tensors (first: {(missing + mismatched)[0]}); {fix}"
        )
    if not any(renamed[k].startswith("layers.") for k in to_load) and any(k.startswith("layers.") for k in sd):
        raise UserError(
            f"checkpoint {path} has no layer tensor that matches the model (matched only: "
            f"{', '.join(sorted(renamed.values())) or 'nothing'}); check model.name and model.flavor"
        )
    load_dcp(to_load, path, partial=True, metadata=metadata)
    loaded = {renamed[k]: v for k, v in to_load.items()}
    options = StateDictOptions(ignore_frozen_params=trainable_only)
    for part in model_parts:  # DSD takes its own names back
        own = {k: loaded[clean_fqn(k)] for k in get_model_state_dict(part, options=options) if clean_fqn(k) in loaded}
        set_model_state_dict(part, own, options=StateDictOptions(strict=False))
    model_keys = set(sd)
    unused = sorted(
        k for k in meta if clean_fqn(k.removeprefix("model.")) not in model_keys and not k.startswith(NON_MODEL_STATE)
    )
    return {"missing": missing, "mismatched": mismatched, "unused": unused}


# Restoring optimizer/scheduler/loader state fails on damage, and on state of another shape.
_RESUME_FIX = (
    "the step folder is damaged, or its optimizer state belongs to another setup (model, optimizer.name): "
    "use another step, or checkpoint.exclude_from_loading = ['optimizer']"
)
# What a restored schedule and an excluded loader mean, said once at load (TorchTitan's checkpoints differ in both).
_NOTES = {
    "lr_scheduler": "lr_scheduler: the step count is restored; the LR is this run's [lr_scheduler] formula at it",
    "dataloader": "dataloader: not restored (checkpoint.exclude_from_loading); the data starts from its beginning",
}


def _load_training_state(stateful: dict[str, Any], names: list[str], path: Path, metadata: Metadata) -> dict:
    """Restore the ``names`` entries of ``stateful`` from ``path``. A key the checkpoint lacks (another trainer's
    layout, e.g. TorchTitan's loader state) is one line naming it and the flag that skips that state."""
    state = {n: stateful[n].state_dict() for n in names}
    missing = [k for k in flatten_state_dict(state)[0] if k not in metadata.state_dict_metadata]
    if missing:
        section = missing[0].split(".")[0]
        raise UserError(
            f"checkpoint {path} has no {missing[0]} ({len(missing)} {section} entries missing: another trainer's "
            f"or version's layout); skip that state with --checkpoint.exclude_from_loading {section}"
        )
    load_dcp(state, path, metadata=metadata, fix=_RESUME_FIX)
    for n in names:
        stateful[n].load_state_dict(state[n])
    if "lr_scheduler" in names:
        logger.info(_NOTES["lr_scheduler"])
    if "dataloader" not in names:
        logger.info(_NOTES["dataloader"])
    return state


T = TypeVar("T")


def _rank0_decides(decide: Callable[[], T]) -> T:
    """``decide()`` on rank 0, broadcast to every rank (just ``decide()`` without a process group)."""
    if not dist.is_initialized():
        return decide()
    box = [decide() if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _every_rank(flag: bool) -> bool:
    """True when ``flag`` is true on every rank (a CPU all-reduce on the default group; ``flag`` without one)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return flag
    box = torch.tensor([int(flag)], dtype=torch.int32)
    dist.all_reduce(box, op=dist.ReduceOp.MIN)
    return bool(box.item())


class CheckpointManager:
    """Saves and restores the whole training state through DCP."""

    def __init__(
        self,
        *,
        config: Any,
        dump_folder: Path,
        model_parts: list[nn.Module],
        optimizers: Any,
        lr_schedulers: Any,
        dataloader: Any,
        train_state: Any,
        model_info: tuple[str, str, Any],
        job_config_dict: dict[str, Any],
        frozen_base: bool = False,
        save_frozen: bool = True,
    ) -> None:
        """``frozen_base`` (LoRA): resuming reads only the trained tensors from the step folder and the frozen base
        weights from ``initial_load_path`` again (or keeps their seeded init without one); ``save_frozen`` false:
        checkpoints leave the frozen weights out."""
        self.config = config
        self.frozen_base = frozen_base
        self.save_frozen = save_frozen
        self.enabled = config.enable
        self.folder = dump_folder / config.folder
        self.model_parts = model_parts
        self.stateful = {
            "optimizer": optimizers,
            "lr_scheduler": lr_schedulers,
            "dataloader": dataloader,
            "train_state": train_state,
        }
        self.model_info = model_info
        self.job_config_dict = job_config_dict
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self._pending: tuple[int, Path, Any] | None = None
        self._staging: Future | None = None
        self._async_pg = None
        if self.enabled and config.async_mode != "disabled" and dist.is_initialized():
            # DCP's collectives run in the background: on a group of their own, apart from the trainer's.
            self._async_pg = dist.new_group(backend="gloo")
        if self.enabled and config.async_mode == "async_with_pinned_mem":
            checkpoint_writer.install()

    # ------------------------------------------------------------------ load
    def load(self) -> int:
        """Resume from the latest complete step (or ``load_step``), else seed from ``initial_load_path``.

        Returns the step to continue from (0 when starting fresh).
        """
        c = self.config
        if self.enabled:
            # Rank 0 reads the folder and every rank follows its choice: ranks listing a shared filesystem
            # on their own can disagree (metadata caches, a marker written a moment ago) and then deadlock.
            step, error = _rank0_decides(self._step_to_resume)
            if error:
                raise UserError(error)
            if step is not None:
                return self._resume(step, self.folder / f"step-{step}")
        if c.initial_load_path:
            return self._initial_load(Path(c.initial_load_path))
        return 0

    def _step_to_resume(self) -> tuple[int | None, str | None]:
        """(step to resume from or None, error message or None), from this rank's view of the folder."""
        for _, path in sorted(step_folders(self.folder, complete_only=False).items()):
            if not (path / COMPLETE_MARKER).exists():
                logger.warning(f"ignoring incomplete checkpoint {path} (no completion marker)")
        complete = step_folders(self.folder)
        wanted = self.config.load_step
        if wanted >= 0 and wanted not in complete:
            return None, (
                f"checkpoint.load_step {wanted} has no complete checkpoint in {self.folder}; "
                f"available: {sorted(complete) or 'none'}"
            )
        if wanted >= 0:
            return wanted, None
        return (max(complete) if complete else None), None

    def _resume(self, step: int, path: Path) -> int:
        t0 = time.perf_counter()
        check_model_family(path, self.model_info[0])
        metadata = read_dcp_metadata(path)
        meta = metadata.state_dict_metadata
        if self.frozen_base and self.config.initial_load_path:
            self._initial_load(Path(self.config.initial_load_path), model_only=True)
        if "train_state.step" not in meta and not any(k.startswith("train_state") for k in meta):
            logger.info(f"checkpoint {path} is model-only: loading weights, starting the schedule at step 0")
            load_model_weights(self.model_parts, path, metadata=metadata, trainable_only=self.frozen_base)
            return 0
        load_model_weights(self.model_parts, path, metadata=metadata, trainable_only=self.frozen_base)
        names = [n for n in NON_MODEL_STATE if n not in self.config.exclude_from_loading]
        _load_training_state(self.stateful, names, path, metadata)
        logger.info(f"resumed from {path} in {time.perf_counter() - t0:.1f}s")
        return step

    def _initial_load(self, path: Path, model_only: bool = False) -> int:
        t0 = time.perf_counter()
        check_model_family(path, self.model_info[0])
        metadata = read_dcp_metadata(path)
        continuing = not (model_only or self.config.initial_load_model_only)  # another run's whole state
        strict = continuing and not self.frozen_base  # continuing: its very model (LoRA: a base without adapters)
        report = load_model_weights(self.model_parts, path, strict_shapes=strict, metadata=metadata)
        logger.info(f"seeded model weights from {path} in {time.perf_counter() - t0:.1f}s")
        if report["missing"]:
            logger.info(f"kept fresh init (absent from {path}): {', '.join(report['missing'])}")
        if report["mismatched"]:
            logger.info(f"kept fresh init (shape differs): {', '.join(report['mismatched'])}")
        if report["unused"]:
            logger.info(f"ignored checkpoint tensors the model does not have: {', '.join(report['unused'])}")
        if not continuing:
            return 0
        # The whole training state, as TorchTitan restores it: this continues another trainer's run (README).
        names = [n for n in NON_MODEL_STATE if n not in self.config.exclude_from_loading]
        state = _load_training_state(self.stateful, names, path, metadata)
        logger.info(f"also restored {', '.join(names) or 'nothing'} from {path}")
        return int(state["train_state"]["step"]) if "train_state" in state else 0

    # ------------------------------------------------------------------ save
    def save(self, step: int, last_step: bool = False, force: bool = False) -> None:
        """Save at every ``interval``, at the last step, and when ``force``d (a job ending early)."""
        if not (self.enabled and (last_step or force or step % self.config.interval == 0)):
            return
        self.wait()
        path = self.folder / f"step-{step}"
        if self.rank == 0:
            if path.exists():
                shutil.rmtree(path)
            path.mkdir(parents=True)
        if dist.is_initialized():
            dist.barrier()
        model_only = last_step and self.config.last_save_model_only
        state: dict[str, Any] = model_state_dict(self.model_parts, trainable_only=not self.save_frozen)
        if model_only:
            dtype = DTYPES[self.config.export_dtype]
            state = {k: v.to(dtype) if torch.is_floating_point(v) else v for k, v in state.items()}
        else:
            state.update({n: s.state_dict() for n, s in self.stateful.items()})
        mode = self.config.async_mode if not (last_step or force) else "disabled"
        t0 = time.perf_counter()
        if mode == "disabled":
            dcp.save(state, checkpoint_id=str(path))  # returns on rank 0 once every rank's write reached it
            self._finalize(step, path)
            logger.info(f"saved checkpoint {path} in {time.perf_counter() - t0:.1f}s")
        else:
            self._pending = (step, path, self._async_save(state, path, mode))
            logger.info(f"staged checkpoint {path} in {time.perf_counter() - t0:.1f}s (writing in background)")

    def _async_save(self, state: dict[str, Any], path: Path, mode: str) -> Future:
        if mode == "async":
            return dcp.async_save(state, checkpoint_id=str(path), process_group=self._async_pg)
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
        from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType

        pinned = torch.cuda.is_available()
        response = dcp.async_save(
            state,
            checkpoint_id=str(path),
            process_group=self._async_pg,
            async_checkpointer_type=AsyncCheckpointerType.PROCESS,
            async_stager=DefaultStager(StagingOptions(pinned, True, True, pinned)),
        )
        self._staging = response.staging_completion
        return response.upload_completion

    def wait_for_staging(self) -> None:
        """Parameters must not change while a pinned-memory save is still copying them."""
        if self._staging is not None:
            self._staging.result()
            self._staging = None

    def poll(self) -> None:
        """Finalize the background save (marker, purge) once it is written on every rank, without blocking.

        Every rank calls this at the end of every step; while a save is pending the ranks all-reduce their
        "done" flags, so all of them finalize at the same step (a rank finalizing alone could sit in a
        collective while the others run the next step's).
        """
        if self._pending is not None and _every_rank(self._pending[2].done()):
            self.wait()

    def wait(self) -> None:
        """Block until the background save is written on every rank, then finalize it. Collective: every rank
        calls it at the same point (a save, the end of training, a stop)."""
        if self._pending is None:
            return
        step, path, future = self._pending
        self._pending = None
        error = future.exception()
        if not _every_rank(error is None):
            what = f"{type(dcp_error(error)).__name__}: {dcp_error(error)}" if error else "failed on another rank"
            raise UserError(
                f"checkpoint {path} could not be written ({str(what).splitlines()[0]}); check free space and "
                f"permissions under {self.folder}; the previous complete checkpoint is intact"
            )
        self._finalize(step, path)

    def _finalize(self, step: int, path: Path) -> None:
        """Rank 0 completes a step folder that every rank has finished writing (the caller made sure)."""
        if self.rank == 0:
            name, flavor, args = self.model_info
            write_model_args(path, name, flavor, args)
            (path / "job_config.json").write_text(json.dumps(self.job_config_dict, indent=2) + "\n")
            (path / COMPLETE_MARKER).write_text(f"{step}\n")
            self._purge()

    def _purge(self) -> None:
        k = self.config.keep_latest_k
        if k <= 0:
            return
        complete = step_folders(self.folder)
        for step in sorted(complete)[:-k]:
            (complete[step] / COMPLETE_MARKER).unlink()  # first: a purge cut short leaves an incomplete folder
            shutil.rmtree(complete[step], ignore_errors=True)
            logger.info(f"removed old checkpoint {complete[step]} (keep_latest_k = {k})")

    def close(self) -> None:
        """Release the checkpoint group. Training waits for its saves before it returns, so a save still pending here
        means it ended by an error, perhaps on some ranks only: that step is left unmarked (never resumed from)
        rather than finalized in a collective that not every rank may reach."""
        if self._pending is not None:
            logger.warning(f"checkpoint {self._pending[1]} was still being written: left incomplete")
            self._pending = None
            return  # its writer may still be using the group
        if self._async_pg is not None:
            dist.destroy_process_group(self._async_pg)
            self._async_pg = None
