"""Every bad input, over every CLI, ends the same way: a non-zero exit, no traceback, exactly one ``error:`` line
naming the problem and the fix (one per job, also with several ranks), nothing on disk that was not there before,
and no code from a checkpoint ever runs (hostile files would create ``CANARY``).

Cases run as forked children of one warm process (``tests/helpers/cli_zygote.py``): a single process, or 2-3 ranks
with the environment and agent store torchrun gives its workers. The ``launcher`` cases go through the real
``run_train.sh`` and ``torchrun``; there only the workers' lines must be clean (torchrun itself reports a failed
worker with its own traceback, which ``run_train.sh`` avoids by checking the config before launching).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, TINY, env
from tests.helpers import bad_inputs as b
from tests.helpers.llama_ckpt import read_dcp
from tests.helpers.torchtitan_ckpt import save_torchtitan_step

pytestmark = pytest.mark.slow

READ_ONLY = "/sys/kernel/torchtitan_hyena_test"  # not writable, even for root
DNA = REPO / "tests" / "assets" / "dna_sample"
CLIS = {
    "train": {"module": "torchtitan_hyena.train"},
    "evaluate": {"module": "torchtitan_hyena.evaluate"},
    "score": {"module": "torchtitan_hyena.score"},
    "merge_lora": {"module": "torchtitan_hyena.merge_lora"},
    "preprocess": {"module": "torchtitan_hyena.preprocess"},
    **{name: {"script": str(REPO / f"{name}.py")} for name in ("llama_to_dcp", "dcp_to_llama", "evo2_to_dcp",
                                                                  "dcp_to_evo2")},
}  # fmt: skip


@dataclass(frozen=True)
class Case:
    cli: str  # a key of CLIS, or "run_train.sh" / "torchrun" (the real launchers)
    args: tuple[str, ...]  # "{w}": this case's workspace, "{name}": an asset
    fragment: str  # must appear in the error line
    ranks: int = 1
    setup: Callable[[Path, dict[str, Path]], None] | None = None
    unset: tuple[str, ...] = ()  # environment variables the CLI must not see


def train(*args: str, fragment: str, ranks: int = 1, base: tuple[str, ...] = tuple(TINY), **kw) -> Case:
    return Case("train", (*base, "--job.dump_folder", "{w}/run", *args), fragment, ranks, **kw)


def hyena(*args: str, **kw) -> Case:
    return train(*args, base=(*TINY, *b.HYENA), **kw)


def resume_from(asset: str) -> Callable[[Path, dict[str, Path]], None]:
    """A run folder whose only complete step is a copy of ``asset``."""

    def setup(work: Path, assets: dict[str, Path]) -> None:
        step = work / "run" / "checkpoint" / "step-1"
        shutil.copytree(assets[asset], step)
        (step / ".complete").write_text("1\n")

    return setup


def file_at(relative: str, text: str = "x") -> Callable[[Path, dict[str, Path]], None]:
    def setup(work: Path, assets: dict[str, Path]) -> None:
        (work / relative).parent.mkdir(parents=True, exist_ok=True)
        (work / relative).write_text(text)

    return setup


RESUME = ("--checkpoint.enable", "true")
SEED = "--checkpoint.initial_load_path"
SCORE = ("--tokens", "{tokens}", "--output", "{w}/scores.jsonl")

CASES: dict[str, Case] = {
    # ---------------------------------------------------------------- config and command line (train)
    "typo_key": train("--training.stepz", "3", fragment="unknown config key training.stepz"),
    "wrong_type": train("--training.steps", "ten", fragment="training.steps expects an integer"),
    "bad_bool": train("--compile.enable", "maybe", fragment="compile.enable expects true or false"),
    "negative_lr": train("--optimizer.lr", "-0.1", fragment="optimizer.lr must be >= 0"),
    "bad_choice": train("--checkpoint.async_mode", "sometimes", fragment="checkpoint.async_mode must be one of"),
    "positional": train("train", fragment="unexpected argument"),
    "batch_not_multiple": train("--training.local_batch_size", "4", "--training.global_batch_size", "6",
                                fragment="multiple of"),
    "unknown_model": train("--model.name", "gpt5", fragment="is not a registered model"),
    "unknown_flavor": train("--model.flavor", "3B", fragment="is not a llama3 flavor"),
    "other_family_key": train("--model.layout", "SDH*",
                              fragment="model.layout = 'SDH*' is hyena's option and model.name 'llama3'"),
    "missing_dataset": train("--training.dataset_path", "/no/such/neural_pile", fragment="does not exist"),
    "missing_split": train("--training.dataset_split", "validation", fragment="has no split 'validation'"),
    "unknown_dataset": train("--training.dataset", "imagenet", fragment="training.dataset 'imagenet' is unknown"),
    "vocab_too_small": train("--model.vocab_size", "200", fragment="model.vocab_size 200 is smaller than"),
    "seq_len_too_long": train("--training.seq_len", "10000000", fragment="fewer than one window"),
    "missing_config": train("--job.config_file", "train_configs/nope.toml",
                            fragment="config file train_configs/nope.toml does not"),
    "config_file_is_folder": train("--job.config_file", "train_configs", fragment="train_configs is a folder"),
    "compile_backend": train("--compile.enable", "true", "--compile.backend", "nosuch",
                             fragment="compile.backend 'nosuch' is not a torch.compile backend"),
    "conv_impl_triton_on_cpu": hyena("--model.conv_impl", "triton", unset=("TRITON_INTERPRET",),
                                     fragment="model.conv_impl = triton needs a GPU"),
    # ---------------------------------------------------------------- impossible pipeline layouts
    "pp_world_size": train("--parallelism.pipeline_parallel_degree", "3", ranks=2,
                           fragment="is not divisible by pipeline_parallel_degree"),
    "pp_too_few_microbatches": train("--parallelism.pipeline_parallel_degree", "2", "--training.local_batch_size", "1",
                                     ranks=2, fragment="needs at least pipeline_parallel_degree (2) microbatches"),
    "pp_split_point_beyond": train("--parallelism.pipeline_parallel_degree", "2",
                                   "--parallelism.pipeline_parallel_split_points", "layers.9", ranks=2,
                                   fragment="must be increasing blocks between layers.1 and layers.5"),
    "pp_validation_batch": train("--parallelism.pipeline_parallel_degree", "2", "--validation.enable", "true",
                                 "--validation.local_batch_size", "4", ranks=2,
                                 fragment="set validation.local_batch_size -1"),
    # ---------------------------------------------------------------- impossible model values
    "rope_theta_negative": train("--model.rope_theta", "-5", fragment="model.rope_theta must be positive, or -1"),
    "rope_pi_factor_zero": hyena("--model.rope_pi_factor", "0", fragment="model.rope_pi_factor must be positive"),
    "rope_scaling_factor_zero": train("--model.rope_scaling", "llama3", "--model.rope_scaling_factor", "0",
                                      fragment="model.rope_scaling_factor must be positive"),
    "rope_low_above_high": train("--model.rope_low_freq_factor", "5", fragment="must be below model.rope_high_freq"),
    "dropout_one": hyena("--model.hidden_dropout", "1", fragment="model.hidden_dropout must be in [0, 1)"),
    "float8_all_gather_without_float8": train("--float8.enable_fsdp_float8_all_gather", "true",
                                              fragment="needs float8.enable = true"),
    "lora_rank_zero": train("--lora.enable", "true", "--lora.rank", "0",
                            fragment="lora.rank and lora.alpha must be positive"),
    "lora_with_float8": train("--lora.enable", "true", "--float8.enable", "true", "--float8.emulate", "true",
                              fragment="lora.enable does not combine with float8.enable"),
    "lora_target_absent": train("--lora.enable", "true", "--lora.target_modules", "q_proj",
                                fragment="match no linear layer of this model; its linear layers are named"),
    # ---------------------------------------------------------------- merge_lora
    "merge_lora_not_lora": Case("merge_lora", ("--input_dir", "{llama}", "--output_dir", "{w}/o"),
                                "job_config.json not found: --input_dir must be a step folder of a LoRA"),
    "merge_lora_missing_base": Case("merge_lora", ("--input_dir", "{lora_no_base}", "--output_dir", "{w}/o"),
                                    "checkpoint.initial_load_path /no/such/base, are not a folder"),
    "merge_lora_no_adapters": Case("merge_lora", ("--input_dir", "{lora_no_adapters}", "--output_dir", "{w}/o"),
                                   "does not match its job_config.json"),
    "merge_lora_output_taken": Case("merge_lora", ("--input_dir", "{lora_no_adapters}", "--output_dir", "{w}/o"),
                                    "exists and is not empty", setup=file_at("o/x")),
    "score_lora_unmerged": Case("score", ("--checkpoint", "{lora_no_adapters}", *SCORE),
                                "is a LoRA checkpoint (adapters apart from the base weights); merge it first"),
    "export_llama_lora_unmerged": Case("dcp_to_llama", ("--input_dir", "{lora_no_adapters}", "--output_dir", "{w}/o"),
                                       "merge it first: python -m torchtitan_hyena.merge_lora"),
    # ---------------------------------------------------------------- output locations (train)
    "dump_folder_is_file": train("--job.dump_folder", "{w}/taken", setup=file_at("taken"),
                                 fragment="job.dump_folder {w}/taken is a file"),
    "dump_folder_under_file": train("--job.dump_folder", "{w}/taken/run", setup=file_at("taken"),
                                    fragment="cannot be created because {w}/taken is a file"),
    "dump_folder_read_only": train("--job.dump_folder", READ_ONLY, fragment="is not writable"),
    "tensorboard_folder_is_file": train("--metrics.enable_tensorboard", "true", setup=file_at("run/tb"),
                                        fragment="metrics.save_tb_folder {w}/run/tb is a file"),
    "checkpoint_folder_is_file": train(*RESUME, setup=file_at("run/checkpoint"),
                                       fragment="checkpoint.folder {w}/run/checkpoint is a file"),
    # ---------------------------------------------------------------- seeding (checkpoint.initial_load_path)
    "seed_missing": train(SEED, "{w}/missing", fragment="does not exist or is not a folder"),
    "seed_not_dcp": train(SEED, "{not_dcp}", fragment="is not a DCP checkpoint"),
    "seed_readme": train(SEED, str(REPO / "README.md"), fragment="does not exist or is not"),
    "seed_hostile_metadata": train(SEED, "{canary_llama}", fragment="refusing {canary_llama}/.metadata: it refers to"),
    "seed_garbage_metadata": train(SEED, "{garbage_metadata}", fragment="it is not a pickle"),
    "seed_metadata_escapes_folder": train(SEED, "{llama_escape}", fragment="which is not a file in the checkpoint"),
    "seed_truncated_shard": train(SEED, "{llama_truncated}", fragment="__0_0.distcp has"),
    "seed_missing_shard": train(SEED, "{llama_missing}", fragment="is incomplete: its metadata names __0_0.distcp"),
    "seed_hybrid_into_llama": train(SEED, "{hyena}", fragment="holds a 'hyena' model but this run trains 'llama3'"),
    "seed_llama_into_hybrid": hyena(SEED, "{llama}", fragment="llama_to_dcp.py --target hyena"),
    "seed_without_layers": train(SEED, "{no_layers}", fragment="has no layer tensor that matches the model"),
    # ---------------------------------------------------------------- resuming
    "resume_load_step_missing": train(*RESUME, "--checkpoint.load_step", "5", fragment="has no complete checkpoint"),
    "resume_hostile_metadata": train(*RESUME, setup=resume_from("canary_llama"), fragment="it refers to posix.system"),
    "resume_truncated_shard": train(*RESUME, setup=resume_from("llama_truncated"), fragment="is damaged"),
    "resume_corrupt_shard": train(*RESUME, setup=resume_from("llama_garbage"), fragment="could not read checkpoint"),
    "resume_other_family": train(*RESUME, setup=resume_from("hyena"), fragment="holds a 'hyena' model"),
    "resume_torchtitan_no_optimizer": train(SEED, "{titan}", "--checkpoint.initial_load_model_only", "false",
                                            fragment="with --checkpoint.exclude_from_loading optimizer"),
    "resume_torchtitan_loader": train(SEED, "{titan}", "--checkpoint.initial_load_model_only", "false",
                                      "--checkpoint.exclude_from_loading", "optimizer",
                                      fragment="has no dataloader.windows_consumed"),
    # ---------------------------------------------------------------- several ranks (torchrun's environment)
    "ranks_world_size_vs_mesh": train("--parallelism.data_parallel_shard_degree", "4", ranks=2,
                                      fragment="multiply to 4 (pp 1 x replicate 1 x shard 4 x cp 1 x tp 1) but"),
    "ranks_cp_seq_len": train("--parallelism.context_parallel_degree", "2", "--training.seq_len", "130", ranks=2,
                              fragment="training.seq_len 130 must be divisible by 4"),
    "ranks_tp_heads": train("--parallelism.tensor_parallel_degree", "3", "--training.seq_len", "129", ranks=3,
                            fragment="does not divide the llama3 model's n_heads = 16"),
    "ranks_replicate_degree": train("--parallelism.data_parallel_replicate_degree", "3", ranks=2,
                                    fragment="world size 2 is not divisible by"),
    "ranks_float8_all_gather_on_gloo": train("--float8.enable", "true", "--float8.emulate", "true",
                                             "--float8.enable_fsdp_float8_all_gather", "true", ranks=2,
                                             fragment="gloo (CPU) cannot all-gather float8"),
    "ranks_typo_key": train("--training.stepz", "3", ranks=2, fragment="unknown config key training.stepz"),
    "ranks_missing_dataset": train("--training.dataset_path", "/no/such/data", ranks=2, fragment="does not exist"),
    "ranks_hostile_seed": train(SEED, "{canary_llama}", ranks=2, fragment="it refers to posix.system"),
    "ranks_corrupt_shard_on_resume": train(*RESUME, setup=resume_from("llama_garbage"), ranks=2,
                                           fragment="could not read checkpoint"),
    # ---------------------------------------------------------------- evaluate
    "evaluate_nothing": Case("evaluate", (*TINY, "--job.dump_folder", "{w}/run"), "nothing to evaluate"),
    "evaluate_hostile": Case("evaluate", (*TINY, "--job.dump_folder", "{w}/run", SEED, "{canary_llama}"),
                             "it refers to posix.system"),
    "evaluate_other_family": Case("evaluate", (*TINY, "--job.dump_folder", "{w}/run", SEED, "{hyena}"),
                                  "holds a 'hyena' model"),
    "evaluate_truncated_shard": Case("evaluate", (*TINY, "--job.dump_folder", "{w}/run", SEED, "{llama_truncated}"),
                                     "is damaged"),
    "evaluate_dump_folder_read_only": Case("evaluate", (*TINY, "--job.dump_folder", READ_ONLY, SEED, "{llama}"),
                                           "is not writable"),
    # ---------------------------------------------------------------- score
    "score_hostile": Case("score", ("--checkpoint", "{canary_llama}", *SCORE), "it refers to posix.system"),
    "score_truncated_shard": Case("score", ("--checkpoint", "{llama_truncated}", *SCORE), "is damaged"),
    "score_corrupt_shard": Case("score", ("--checkpoint", "{llama_garbage}", *SCORE), "could not read checkpoint"),
    "score_args_wrong_type": Case("score", ("--checkpoint", "{llama_args_wrong_type}", *SCORE),
                                  "dim = 'big' is not a valid int"),
    "score_args_zero_eps": Case("score", ("--checkpoint", "{llama_args_zero_eps}", *SCORE), "norm_eps must be positive"
                                ),
    "score_args_not_json": Case("score", ("--checkpoint", "{llama_args_not_json}", *SCORE),
                                "is not a valid model-args file"),
    "score_output_read_only": Case("score", ("--checkpoint", "{llama}", "--tokens", SCORE[1], "--output",
                                             f"{READ_ONLY}/s.jsonl"), "is not writable"),
    "score_output_is_folder": Case("score", ("--checkpoint", "{llama}", "--tokens", SCORE[1], "--output", "{w}"),
                                   "is a folder"),
    # ---------------------------------------------------------------- preprocess
    "preprocess_missing_input": Case("preprocess", ("--input", "{w}/none.fa", "--output_dir", "{w}/out"),
                                     "does not exist"),
    "preprocess_garbage_fasta": Case("preprocess", ("--input", "{bad_fasta}", "--output_dir", "{w}/out"),
                                     "not printable ASCII"),
    "preprocess_empty_fasta": Case("preprocess", ("--input", "{empty_fasta}", "--output_dir", "{w}/out"),
                                   "holds no FASTA record"),
    "preprocess_malformed_jsonl": Case("preprocess", ("--input", "{bad_jsonl}", "--output_dir", "{w}/out"),
                                       "is not a JSON object"),
    "preprocess_jsonl_without_key": Case("preprocess", ("--input", "{nokey_jsonl}", "--output_dir", "{w}/out"),
                                         'with a "text" string'),
    "preprocess_mixed_formats": Case("preprocess", ("--input", str(DNA / "train.fasta"), "{bad_jsonl}",
                                                    "--output_dir", "{w}/out"), "is not a fasta file like"),
    "preprocess_output_not_empty": Case("preprocess", ("--input", str(DNA / "train.fasta"), "--output_dir", "{w}/out"),
                                        "holds notes.txt, which is no preprocessed split",
                                        setup=file_at("out/notes.txt")),
    "preprocess_split_exists": Case("preprocess", ("--input", str(DNA / "train.fasta"), "--output_dir", "{w}/out"),
                                    "already holds split 'train'",
                                    setup=lambda w, a: [file_at(f"out/train{x}")(w, a)
                                                        for x in (".bin", ".index.npy", ".json")]),
    "preprocess_output_read_only": Case("preprocess", ("--input", str(DNA / "train.fasta"), "--output_dir", READ_ONLY),
                                        "is not writable"),
    "preprocess_output_is_file": Case("preprocess", ("--input", str(DNA / "train.fasta"), "--output_dir", "{w}/f"),
                                      "--output_dir {w}/f is a file", setup=file_at("f")),
    # ---------------------------------------------------------------- llama_to_dcp
    "llama_truncated_safetensors": Case("llama_to_dcp", ("--input_dir", "{hf_truncated}", "--output_dir", "{w}/o"),
                                        "not a complete safetensors file"),
    "llama_garbage_safetensors": Case("llama_to_dcp", ("--input_dir", "{hf_garbage}", "--output_dir", "{w}/o"),
                                      "not a complete safetensors file"),
    "llama_config_wrong_type": Case("llama_to_dcp", ("--input_dir", "{hf_wrong_type}", "--output_dir", "{w}/o"),
                                    "num_hidden_layers = 'six' is not an integer"),
    "llama_truncated_pth": Case("llama_to_dcp", ("--input_dir", "{meta_truncated}", "--output_dir", "{w}/o"),
                                "not a complete PyTorch checkpoint, truncated or damaged"),
    "llama_hostile_pth": Case("llama_to_dcp", ("--input_dir", "{meta_hostile}", "--output_dir", "{w}/o"),
                              "loading them could run code; refused"),
    "llama_params_zero_eps": Case("llama_to_dcp", ("--input_dir", "{meta_zero_eps}", "--output_dir", "{w}/o"),
                                  "norm_eps must be positive"),
    "llama_output_read_only": Case("llama_to_dcp", ("--input_dir", "{hf}", "--output_dir", f"{READ_ONLY}/o"),
                                   "is not writable"),
    "llama_output_not_empty": Case("llama_to_dcp", ("--input_dir", "{hf}", "--output_dir", "{w}/o"),
                                   "exists and is not empty; pass --overwrite", setup=file_at("o/keep")),
    # ---------------------------------------------------------------- evo2_to_dcp
    "evo2_truncated_pt": Case("evo2_to_dcp", ("--input", "{vortex_truncated}", "--config", "debugmodel",
                                              "--output_dir", "{w}/o"), "not a complete PyTorch checkpoint"),
    "evo2_hostile_pt": Case("evo2_to_dcp", ("--input", "{vortex_hostile}", "--config", "debugmodel",
                                            "--output_dir", "{w}/o"), "loading them could run code; refused"),
    "evo2_config_wrong_type": Case("evo2_to_dcp", ("--input", "{vortex_truncated}", "--config", "{bad_yaml}",
                                                   "--output_dir", "{w}/o"), "has a value of the wrong type"),
    "evo2_output_read_only": Case("evo2_to_dcp", ("--input", "{vortex_truncated}", "--config", "debugmodel",
                                                  "--output_dir", f"{READ_ONLY}/o"), "is not writable"),
    # ---------------------------------------------------------------- dcp_to_llama
    "export_llama_hostile": Case("dcp_to_llama", ("--input_dir", "{canary_llama}", "--output_dir", "{w}/o"),
                                 "it refers to posix.system"),
    "export_llama_from_hybrid": Case("dcp_to_llama", ("--input_dir", "{hyena}", "--output_dir", "{w}/o"),
                                     "holds a 'hyena' model; dcp_to_llama.py exports llama3"),
    "export_llama_truncated_shard": Case("dcp_to_llama", ("--input_dir", "{llama_truncated}", "--output_dir", "{w}/o"),
                                         "is damaged"),
    "export_llama_corrupt_shard": Case("dcp_to_llama", ("--input_dir", "{llama_garbage}", "--output_dir", "{w}/o"),
                                       "could not read checkpoint"),
    "export_llama_args_wrong_type": Case("dcp_to_llama", ("--input_dir", "{llama_args_wrong_type}", "--output_dir",
                                                          "{w}/o"), "dim = 'big' is not a valid int"),
    "export_llama_no_model_args": Case("dcp_to_llama", ("--input_dir", "{titan}", "--output_dir", "{w}/o"),
                                       "has no model_args.json (a TorchTitan or gpt-neuro checkpoint)"),
    "export_llama_foreign_shape": Case("dcp_to_llama", ("--input_dir", "{titan}", "--output_dir", "{w}/o", "--flavor",
                                                        "debugmodel", "--vocab_size", "512"),
                                       "tok_embeddings.weight has shape [256, 256] but the model needs [512, 256]"),
    "export_llama_output_read_only": Case("dcp_to_llama", ("--input_dir", "{llama}", "--output_dir",
                                                           f"{READ_ONLY}/o"), "is not writable"),
    # ---------------------------------------------------------------- dcp_to_evo2
    "export_evo2_hostile": Case("dcp_to_evo2", ("--input_dir", "{canary_hyena}", "--output", "{w}/m.pt"),
                                "it refers to posix.system"),
    "export_evo2_from_llama": Case("dcp_to_evo2", ("--input_dir", "{llama}", "--output", "{w}/new/m.pt"),
                                   "holds a 'llama3' model; dcp_to_evo2 exports hyena"),
    "export_evo2_output_exists": Case("dcp_to_evo2", ("--input_dir", "{hyena}", "--output", "{w}/m.pt"),
                                      "already exists; pass --overwrite", setup=file_at("m.pt")),
    "export_evo2_output_read_only": Case("dcp_to_evo2", ("--input_dir", "{hyena}", "--output", f"{READ_ONLY}/m.pt"),
                                         "is not writable"),
    "export_evo2_not_pt": Case("dcp_to_evo2", ("--input_dir", "{hyena}", "--output", "{w}/m.bin"), "must end in .pt"),
    # ---------------------------------------------------------------- the real launchers
    "launcher_run_train_config": Case("run_train.sh", ("--training.stepz", "3"), "unknown config key training.stepz"),
    "launcher_run_train_layout": Case("run_train.sh", ("--parallelism.tensor_parallel_degree", "3"),
                                      "world size 2 is not divisible"),
    "launcher_torchrun_corrupt_resume": Case("torchrun", (*TINY, "--job.dump_folder", "{w}/run", *RESUME),
                                             "could not read checkpoint", setup=resume_from("llama_garbage")),
}  # fmt: skip


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("assets")
    a: dict[str, Path] = {"root": root, "canary": root / "CANARY"}
    a["llama"] = b.save_model_dcp(root / "llama", TINY)
    a["hyena"] = b.save_model_dcp(root / "hyena", [*TINY, *b.HYENA])
    a["canary_llama"] = b.hostile_metadata(root / "canary_llama", a["llama"], a["canary"])
    a["canary_hyena"] = b.hostile_metadata(root / "canary_hyena", a["hyena"], a["canary"])
    for how in ("truncated", "missing", "garbage"):
        a[f"llama_{how}"] = b.damaged_copy(a["llama"], root / f"llama_{how}", how)
    a["llama_escape"] = b.escaping_metadata(a["llama"], root / "llama_escape")
    a["not_dcp"] = root / "not_dcp"
    a["not_dcp"].mkdir()
    a["garbage_metadata"] = root / "garbage_metadata"
    a["garbage_metadata"].mkdir()
    (a["garbage_metadata"] / ".metadata").write_bytes(b"not a pickle")
    shared = {k: torch.zeros(256, 256) for k in ("tok_embeddings.weight", "output.weight")}
    a["no_layers"] = b.save_model_dcp(root / "no_layers", TINY, {**shared, "norm.weight": torch.ones(256)})
    (a["no_layers"] / "model_args.json").unlink()  # another tool's DCP: only its keys tell what it is
    a["titan"] = save_torchtitan_step(root / "titan", read_dcp(a["llama"]), step=2)  # TorchTitan's layout, no optimizer
    a["llama_args_wrong_type"] = b.edit_model_args(a["llama"], root / "args_type", dim="big")
    a["llama_args_zero_eps"] = b.edit_model_args(a["llama"], root / "args_eps", norm_eps=0.0)
    a["llama_args_not_json"] = b.edit_model_args(a["llama"], root / "args_json")
    (a["llama_args_not_json"] / "model_args.json").write_text("{not json")
    for name, base in (("lora_no_base", "/no/such/base"), ("lora_no_adapters", "")):
        a[name] = b.edit_model_args(a["llama"], root / name)
        job = {"lora": {"enable": True}, "checkpoint": {"initial_load_path": base}, "training": {"seed": 0}}
        (a[name] / "job_config.json").write_text(json.dumps(job))
    a.update(b.llama_sources(root))
    torch.save({"blocks.0.x": torch.zeros(64, 64)}, root / "vortex.pt")
    a["vortex_truncated"] = root / "vortex_truncated.pt"
    a["vortex_truncated"].write_bytes((root / "vortex.pt").read_bytes()[:300])
    a["vortex_hostile"] = root / "vortex_hostile.pt"
    torch.save({"blocks.0.x": b.Canary(a["canary"])}, a["vortex_hostile"])
    a["bad_yaml"] = root / "bad.yml"
    a["bad_yaml"].write_text("hidden_size: big\nnum_layers: 2\n")
    for name, (file, text) in {"bad_fasta": ("bad.fa", ">a\nACGT\n>b\nAC\tGT\n"), "empty_fasta": ("empty.fa", ""),
                               "bad_jsonl": ("bad.jsonl", "not json\n"),
                               "nokey_jsonl": ("nokey.jsonl", '{"txt": "AC"}\n'),
                               "tokens": ("tokens.jsonl", '{"tokens": [1, 2, 3]}\n')}.items():  # fmt: skip
        a[name] = root / file
        a[name].write_text(text)
    return a


@pytest.fixture(scope="module")
def zygote():
    proc = subprocess.Popen([sys.executable, "-m", "tests.helpers.cli_zygote"], cwd=REPO, env=env(), text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)  # fmt: skip
    yield proc
    proc.stdin.close()
    proc.wait(timeout=60)


def snapshot(root: Path) -> dict[str, int]:
    """Every path under ``root`` (hidden ones too) with its size (-1 for folders)."""
    found = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder) / name
            found[str(path.relative_to(root))] = -1 if path.is_dir() else path.stat().st_size
    return found


def run_case(case: Case, args: list[str], work: Path, zygote) -> tuple[list[int], list[str]]:
    """(exit codes, output of each rank/worker) of one case."""
    if case.cli in CLIS:
        request = {**CLIS[case.cli], "argv": args, "cwd": str(REPO), "unset": list(case.unset),
                   "ranks": case.ranks, "log": str(work.parent / "log"), "timeout": 300}  # fmt: skip
        zygote.stdin.write(json.dumps(request) + "\n")
        zygote.stdin.flush()
        reply = json.loads(zygote.stdout.readline())
        assert not reply["timed_out"], "the case hung"
        logs = [(work.parent / f"log.{r}").read_text() for r in range(case.ranks)]
        return reply["returncodes"], logs
    e = {**env(), "NGPU": "2", "CONFIG_FILE": TINY[1], "PYTHON": sys.executable}
    if case.cli == "run_train.sh":
        cmd = ["bash", str(REPO / "run_train.sh"), *TINY[2:], "--job.dump_folder", str(work / "run"), *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "--tee", "3",
               "--role", "rank", "-m", "torchtitan_hyena.train", *args]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=e, capture_output=True, text=True, timeout=600)
    output = proc.stdout + proc.stderr
    if case.cli == "torchrun":  # the workers' lines only: torchrun's own failure report is not ours to change
        output = "\n".join(re.sub(r"^\[rank\d+\]:", "", line) for line in output.splitlines()
                           if re.match(r"^\[rank\d+\]:", line))  # fmt: skip
    return [proc.returncode], [output]


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input(name, assets, zygote, tmp_path):
    case = CASES[name]
    work = tmp_path / "w"
    work.mkdir()
    if case.setup is not None:
        case.setup(work, assets)
    names = {k: str(v) for k, v in assets.items()}
    args = [a.format(w=work, **names) for a in case.args]
    before = snapshot(work), snapshot(assets["root"]), sorted(os.listdir(REPO))
    codes, outputs = run_case(case, args, work, zygote)
    text = "\n".join(outputs)
    assert all(code == 2 for code in codes) if case.cli in CLIS else codes[0] != 0, (codes, text[-3000:])
    assert "Traceback" not in text, text[-3000:]
    errors = [line for line in text.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, text[-3000:]
    assert case.fragment.format(w=work, **names) in errors[0], errors[0]
    assert (snapshot(work), snapshot(assets["root"]), sorted(os.listdir(REPO))) == before
    assert not assets["canary"].exists() and not Path(READ_ONLY).exists()


def test_seq_len_must_split_across_tp_and_cp():
    """Checked before any model is built; needs no processes (the check only reads the degrees)."""
    from torchtitan_hyena.build import validate_layout
    from torchtitan_hyena.config import ConfigManager
    from torchtitan_hyena.distributed.float8 import Accelerator
    from torchtitan_hyena.distributed.parallel_dims import ParallelDims
    from torchtitan_hyena.errors import ConfigError

    def check(seq_len: int, tp: int, cp: int) -> None:
        config = ConfigManager().parse_args(["--training.seq_len", str(seq_len)])
        dims = ParallelDims(dp_replicate=1, dp_shard=1, cp=cp, tp=tp, world_size=tp * cp)
        validate_layout(config, dims, Accelerator("cpu", "cpu"))

    check(128, tp=2, cp=2)
    with pytest.raises(ConfigError, match=r"training.seq_len 130 must be divisible by 8"):
        check(130, tp=2, cp=2)
    with pytest.raises(ConfigError, match=r"training.seq_len 127 must be divisible by 2"):
        check(127, tp=2, cp=1)
