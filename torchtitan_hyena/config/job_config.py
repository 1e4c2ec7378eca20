"""JobConfig: one dataclass per TOML section.

Every field carries a one-line ``help`` and, where the set of values is closed, ``choices``;
:mod:`torchtitan_hyena.config.manager` uses both for ``--help``, parsing and validation.
Key names follow TorchTitan v0.2 so that configs and scripts written for it read naturally.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


def opt(default: Any, help: str, choices: tuple[Any, ...] | None = None) -> Any:
    """A config field with its help line (and optional closed set of values)."""
    meta = {"help": help, "choices": choices}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class Job:
    config_file: str = opt("", "TOML file to read before command-line overrides")
    dump_folder: str = opt("./outputs", "folder for checkpoints, tensorboard logs and metrics.jsonl")
    description: str = opt("", "free-text description of the run")
    print_config: bool = opt(True, "print the resolved config as a table at start")


@dataclass
class Profiling:
    enable_profiling: bool = opt(False, "record torch profiler traces")
    save_traces_folder: str = opt("profile_trace", "trace folder, relative to dump_folder")
    profile_freq: int = opt(10, "profile one step every N steps")
    enable_memory_snapshot: bool = opt(False, "dump CUDA/ROCm allocator snapshots (no-op on CPU)")
    save_memory_snapshot_folder: str = opt("memory_snapshot", "memory snapshot folder, relative to dump_folder")


@dataclass
class Metrics:
    log_freq: int = opt(10, "log metrics every N steps (console, metrics.jsonl, tensorboard)")
    enable_tensorboard: bool = opt(False, "write tensorboard events")
    save_tb_folder: str = opt("tb", "tensorboard folder, relative to dump_folder")


@dataclass
class Model:
    name: str = opt("llama3", "model family registered in the TrainSpec registry (llama3, hyena)")
    flavor: str = opt("debugmodel", "size preset of the model family")
    vocab_size: int = opt(-1, "vocabulary size; -1 keeps the flavor's")
    attention_backend: str = opt("sdpa", "attention kernel", ("sdpa", "flash", "auto"))
    conv_impl: str = opt(
        "auto", "Hyena convolution kernels: triton on GPU, torch elsewhere", ("auto", "triton", "torch")
    )
    rope_scaling: str = opt("none", "RoPE frequency scaling (llama3 = Llama-3.1 style)", ("none", "llama3"))
    rope_scaling_factor: float = opt(8.0, "Llama-3.1 RoPE scaling factor")
    rope_low_freq_factor: float = opt(1.0, "Llama-3.1 RoPE low-frequency factor")
    rope_high_freq_factor: float = opt(4.0, "Llama-3.1 RoPE high-frequency factor")
    rope_original_max_position: int = opt(8192, "context length the RoPE frequencies were trained at")
    layout: str = opt(
        "", "hyena: layers S (SE) D (MR) H (LI) * (attention): SDH*SDH* or S:0,4;D:1,5;H:2,6;*:3,7; empty = flavor's"
    )
    li_filter: str = opt(
        "", "hyena: Hyena-LI filter; empty keeps the flavor's", ("", "implicit_modal", "implicit_freeform")
    )
    mlp_activation: str = opt(
        "", "hyena: evo2 = GELU in layer 0 only, gelu / silu = in every MLP", ("", "evo2", "gelu", "silu")
    )
    tie_embeddings: bool = opt(True, "hyena: the output head reuses the embedding matrix (Evo 2)")
    rope_theta: float = opt(-1.0, "RoPE base (context extension: ABF); -1 keeps the flavor's")
    rope_pi_factor: float = opt(-1.0, "hyena: RoPE linear position interpolation, t -> t / factor; -1 keeps flavor's")
    attention_dropout: float = opt(0.0, "hyena: dropout on attention probabilities (training only)")
    hidden_dropout: float = opt(0.0, "hyena: dropout on mixer and MLP outputs before each residual add")
    embedding_init_std: float = opt(-1.0, "hyena: embedding init std; -1 keeps savanna small_init sqrt(2/(5*dim))")


@dataclass
class Optimizer:
    name: str = opt("AdamW", "optimizer", ("AdamW", "Adam"))
    lr: float = opt(8e-4, "peak learning rate")
    beta1: float = opt(0.9, "Adam beta1")
    beta2: float = opt(0.95, "Adam beta2")
    eps: float = opt(1e-8, "Adam epsilon")
    weight_decay: float = opt(0.1, "decoupled weight decay")
    decay_norms_and_embeddings: bool = opt(
        True, "apply weight decay to norms, embeddings, biases and filters too (false: matrices only)"
    )
    implementation: str = opt(
        "auto", "kernel: auto picks fused where supported", ("auto", "fused", "foreach", "for-loop")
    )


@dataclass
class LRScheduler:
    warmup_steps: int = opt(200, "linear warmup steps")
    decay_ratio: float = opt(-1.0, "fraction of steps spent decaying at the end (WSD); -1 decays after warmup")
    decay_type: str = opt("linear", "decay shape", ("linear", "sqrt", "cosine"))
    min_lr_factor: float = opt(0.0, "final lr as a fraction of the peak")


@dataclass
class Training:
    dataset: str = opt("neural_pile", "dataset kind (neural_pile, dna, memmap, mock, ...)")
    dataset_path: str = opt(
        "tests/assets/neural_pile_sample",
        "HF repo id (e.g. eminorhan/neural-pile-rodent) or local folder; dna: FASTA/jsonl file or folder; "
        "memmap: preprocess output folder",
    )
    dataset_split: str = opt("train", "split to train on")
    shuffle: bool = opt(False, "shuffle rows (documents) each epoch with the training seed")
    to_upper: str = opt(
        "normalized_weighted",
        "DNA/byte data: uppercase inputs and labels; weighted: lowercase labels get lowercase_loss_reweighting; "
        "normalized_weighted (Evo 2): weighted, then renormalized to sum to each microbatch's label count",
        ("none", "upper", "weighted", "normalized_weighted"),
    )
    lowercase_loss_reweighting: float = opt(0.1, "DNA/byte data: loss weight of lowercase (soft-masked) labels")
    mask_loss_control_tags: bool = opt(True, "DNA/byte data: no loss on control tags (@, #, |d__...;...| spans)")
    eod_loss_mask: str = opt(
        "none",
        "DNA/byte data: drop the loss on the label after an EOD (after_eod, Megatron eod_mask_loss), on EOD labels "
        "(eod), or both",
        ("none", "after_eod", "eod", "both"),
    )
    local_batch_size: int = opt(8, "sequences per microbatch per data-parallel rank")
    global_batch_size: int = opt(-1, "sequences per optimizer step; -1 = local x data-parallel degree")
    seq_len: int = opt(2048, "tokens per sequence (also the model's max length)")
    steps: int = opt(10000, "optimizer steps to train (the LR schedule spans them)")
    stop_at_step: int = opt(-1, "end this job after this step, saving a checkpoint; -1 runs to training.steps")
    max_norm: float = opt(1.0, "gradient clipping max norm; 0 disables")
    mixed_precision_param: str = opt("bfloat16", "FSDP parameter dtype", ("bfloat16", "float32", "float16"))
    mixed_precision_reduce: str = opt("float32", "FSDP gradient reduce dtype", ("float32", "bfloat16"))
    seed: int = opt(0, "seed for weights, data order and dropout")
    deterministic: bool = opt(False, "deterministic kernels (bit-reproducible on CPU)")
    gc_freq: int = opt(50, "run Python GC every N steps (automatic GC is disabled)")
    enable_cpu_offload: bool = opt(False, "FSDP CPU offload of parameters, gradients and optimizer state")
    on_nonfinite_loss: str = opt(
        "stop", "NaN/Inf loss or grad norm: stop before the update (exit 3), or skip the update", ("stop", "skip")
    )
    max_nonfinite_skips: int = opt(10, "with on_nonfinite_loss = skip: stop at the next bad step after this many")


@dataclass
class Parallelism:
    data_parallel_replicate_degree: int = opt(1, "HSDP replicas (DDP-style)")
    data_parallel_shard_degree: int = opt(-1, "FSDP shards; -1 takes the ranks left over")
    tensor_parallel_degree: int = opt(1, "tensor (and sequence) parallel degree")
    context_parallel_degree: int = opt(1, "context parallel degree (sequence sharded over this many ranks)")
    context_parallel_rotate_method: str = opt(
        "allgather", "CP attention: all-gather K/V once, or pass K/V blocks around a ring", ("allgather", "ring")
    )
    context_parallel_mr_method: str = opt(
        "halo", "hyena: CP for Hyena-MR convs: p2p halo of 127 positions, or all-to-all", ("halo", "alltoall")
    )
    enable_loss_parallel: bool = opt(False, "cross entropy on vocab-sharded logits (needs tensor_parallel_degree > 1)")
    enable_async_tensor_parallel: bool = opt(
        False, "overlap TP collectives with matmuls (needs compile and NVIDIA; skipped with a warning elsewhere)"
    )
    fsdp_reshard_after_forward: str = opt(
        "default", "free gathered params after forward", ("default", "always", "never")
    )
    pipeline_parallel_degree: int = opt(1, "pipeline stages' rank groups (layers split into consecutive stages)")
    pipeline_parallel_schedule: str = opt(
        "1F1B", "torch.distributed.pipelining schedule", ("GPipe", "1F1B", "Interleaved1F1B")
    )
    pipeline_parallel_microbatch_size: int = opt(1, "sequences per pipeline microbatch (divides local_batch_size)")
    pipeline_parallel_split_points: list[str] = opt(
        [], "first module of each stage after the first, e.g. ['layers.4']; empty: balanced by FLOPs"
    )
    pipeline_parallel_layers_per_stage: int = opt(-1, "layers per stage (the last may hold fewer); -1: balanced")


@dataclass
class Checkpoint:
    enable: bool = opt(False, "save and resume DCP checkpoints")
    folder: str = opt("checkpoint", "checkpoint folder, relative to dump_folder")
    interval: int = opt(500, "save every N steps (and at the last step)")
    keep_latest_k: int = opt(10, "keep only the newest K complete checkpoints; 0 keeps all")
    async_mode: str = opt("disabled", "save in the background", ("disabled", "async", "async_with_pinned_mem"))
    initial_load_path: str = opt("", "DCP folder to seed from when the run has no checkpoint yet")
    initial_load_model_only: bool = opt(
        True, "seed only the model weights from initial_load_path; false: its whole training state (continue a run)"
    )
    last_save_model_only: bool = opt(False, "the final checkpoint holds model weights only")
    export_dtype: str = opt("float32", "dtype of a model-only final checkpoint", ("float32", "bfloat16", "float16"))
    load_step: int = opt(-1, "resume from this step instead of the latest")
    exclude_from_loading: list[str] = opt([], "state to skip when resuming (optimizer, lr_scheduler, dataloader)")


@dataclass
class ActivationCheckpoint:
    mode: str = opt("none", "activation checkpointing", ("none", "full", "selective"))
    selective_ac_option: str = opt("2", "selective: 'op' for per-op SAC, or N to checkpoint every N-th block")


@dataclass
class Compile:
    enable: bool = opt(False, "torch.compile each block and the loss")
    components: list[str] = opt(["model", "loss"], "what to compile (model, loss)")
    backend: str = opt("inductor", "torch.compile backend")


@dataclass
class Float8:
    enable: bool = opt(False, "float8 linear layers through torchao")
    recipe: str = opt("tensorwise", "scaling recipe", ("tensorwise", "rowwise", "rowwise_with_gw_hp"))
    emulate: bool = opt(False, "emulate float8 on any device (eager only; for tests)")
    enable_fsdp_float8_all_gather: bool = opt(False, "all-gather FSDP params in float8 (tensorwise)")
    precompute_float8_dynamic_scale_for_fsdp: bool = opt(False, "one all-reduce for all float8 scales per step")
    filter_fqns: list[str] = opt(["output"], "linear layers (name fragments) kept in high precision")


@dataclass
class Comm:
    init_timeout_seconds: int = opt(300, "timeout for the first collective")
    warmup_timeout_seconds: int = opt(120, "deadline of each mesh group's first collective at start-up")
    train_timeout_seconds: int = opt(100, "timeout for collectives after the first step")
    trace_buf_size: int = opt(20000, "NCCL flight-recorder entries (0 disables)")


@dataclass
class Validation:
    enable: bool = opt(False, "evaluate on a held-out split periodically")
    dataset_split: str = opt("test", "split to evaluate on (same dataset as training)")
    freq: int = opt(100, "validate every N steps")
    steps: int = opt(10, "validation batches per evaluation; -1 runs the whole split")
    local_batch_size: int = opt(-1, "validation sequences per rank; -1 uses training.local_batch_size")


@dataclass
class Lora:
    enable: bool = opt(False, "LoRA fine-tuning: low-rank adapters on target_modules, every other weight frozen")
    rank: int = opt(8, "adapter rank r")
    alpha: float = opt(16.0, "adapter scale: the update is multiplied by alpha / rank")
    dropout: float = opt(0.0, "dropout on the adapters' input (training only)")
    target_modules: list[str] = opt(
        ["wq", "wk", "wv", "wo", "wqkv", "projections", "out_proj"],
        "linear layers to adapt: fnmatch patterns of the full name or its last part; the default is every mixer's "
        "input and output projections (attention of both families, Hyena); add w1,w2,w3 for the MLPs. Hyena "
        "filters only when named",
    )
    train_embeddings: bool = opt(False, "also train the embeddings and the (untied) output head")
    train_norms: bool = opt(False, "also train the norms")
    save_base_weights: bool = opt(
        False, "checkpoints also hold the frozen base weights (default: adapters, trained weights and optimizer only)"
    )


SECTIONS: dict[str, type] = {
    "job": Job,
    "profiling": Profiling,
    "metrics": Metrics,
    "model": Model,
    "optimizer": Optimizer,
    "lr_scheduler": LRScheduler,
    "training": Training,
    "parallelism": Parallelism,
    "checkpoint": Checkpoint,
    "activation_checkpoint": ActivationCheckpoint,
    "compile": Compile,
    "float8": Float8,
    "comm": Comm,
    "validation": Validation,
    "lora": Lora,
}


@dataclass
class JobConfig:
    job: Job = field(default_factory=Job)
    profiling: Profiling = field(default_factory=Profiling)
    metrics: Metrics = field(default_factory=Metrics)
    model: Model = field(default_factory=Model)
    optimizer: Optimizer = field(default_factory=Optimizer)
    lr_scheduler: LRScheduler = field(default_factory=LRScheduler)
    training: Training = field(default_factory=Training)
    parallelism: Parallelism = field(default_factory=Parallelism)
    checkpoint: Checkpoint = field(default_factory=Checkpoint)
    activation_checkpoint: ActivationCheckpoint = field(default_factory=ActivationCheckpoint)
    compile: Compile = field(default_factory=Compile)
    float8: Float8 = field(default_factory=Float8)
    comm: Comm = field(default_factory=Comm)
    validation: Validation = field(default_factory=Validation)
    lora: Lora = field(default_factory=Lora)
