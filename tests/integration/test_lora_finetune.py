"""LoRA fine-tuning end to end on the debug models, seeded from a base checkpoint: FSDP 2 x TP 2 matches one
process (both families; also with AC and bf16; AC + compile on one process), a resume is bit-exact, the merged
export scores like the adapted model and loads in transformers.

One 4-rank torchrun job (FSDP 2 x TP 2 runs) and one 1-rank job (the references, AC + compile, the resume).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from tests.conftest import TINY, assert_losses_close, torchrun_runs
from tests.helpers.bad_inputs import HYENA
from torchtitan_hyena.build import init_lora, load_model, meta_model, model_args_from_config
from torchtitan_hyena.components.checkpoint import load_model_weights
from torchtitan_hyena.components.dcp_reader import read_dcp_metadata
from torchtitan_hyena.components.lora import apply_lora
from torchtitan_hyena.config import ConfigManager
from torchtitan_hyena.convert.llama import dcp_to_llama
from torchtitan_hyena.merge_lora import merge_lora
from torchtitan_hyena.protocols.model import write_model_args
from torchtitan_hyena.protocols.train_spec import get_train_spec
from torchtitan_hyena.score import score_sequences

pytestmark = pytest.mark.slow
CPU = torch.device("cpu")
STEPS = [
    "--training.steps",
    "4",
    "--training.seq_len",
    "64",
    "--training.global_batch_size",
    "4",
    "--optimizer.lr",
    "1e-3",
]
TARGETS = "wq,wk,wv,wo,wqkv,projections,out_proj,w2"  # the defaults and a rowwise MLP layer
LORA = ["--lora.enable", "true", "--lora.rank", "4", "--lora.target_modules", TARGETS]
CKPT = ["--checkpoint.enable", "true", "--checkpoint.interval", "2", "--checkpoint.keep_latest_k", "0"]
AC_COMPILE = ["--activation_checkpoint.mode", "full", "--compile.enable", "true", "--compile.backend", "aot_eager"]
FSDP2_TP2 = ["--parallelism.data_parallel_shard_degree", "2", "--parallelism.tensor_parallel_degree", "2"]


def save_base(folder: Path, config_args: list[str], seed: int = 7) -> Path:
    """A converted-checkpoint stand-in: the family's debug model drawn with another seed than the runs'."""
    c = ConfigManager().parse_args(config_args)
    spec = get_train_spec(c.model.name)
    args = model_args_from_config(spec, c)
    model = meta_model(spec, args)
    model.to_empty(device=CPU)
    with torch.no_grad():
        model.init_weights(buffer_device=CPU, seed=seed)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save(model.state_dict(), checkpoint_id=str(folder), no_dist=True)
    write_model_args(folder, c.model.name, c.model.flavor, args)
    return folder


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("lora")
    bases = {"llama": save_base(root / "base_llama", TINY), "hyena": save_base(root / "base_hyena", [*TINY, *HYENA])}
    family = {"llama": TINY, "hyena": [*TINY, *HYENA]}

    def run(name: str, fam: str, *extra: str, dump: str | None = None) -> list[str]:
        seed = ["--checkpoint.initial_load_path", str(bases[fam])]
        return [*family[fam], *STEPS, *LORA, *seed, *extra, "--job.dump_folder", str(root / (dump or name))]

    one = {
        "llama": run("llama", "llama", *CKPT, "--training.local_batch_size", "4"),
        "hyena": run("hyena", "hyena", "--training.local_batch_size", "4"),
        "stop": run("stop", "llama", *CKPT, "--training.local_batch_size", "4", "--training.stop_at_step", "2",
                    dump="resume"),
        "resume": run("resume", "llama", *CKPT, "--training.local_batch_size", "4", dump="resume"),
    }  # fmt: skip
    one["ac_compile"] = run("ac_compile", "llama", "--training.local_batch_size", "4", *AC_COMPILE)
    four = {
        "llama": run("llama4", "llama", *FSDP2_TP2),
        "hyena": run("hyena4", "hyena", *FSDP2_TP2),
        # AC without compile: AOTAutograd refuses the LoRA hybrid block under TP (aliased DTensor outputs)
        "bf16": run("bf16", "hyena", *FSDP2_TP2, *AC_COMPILE[:2], "--training.mixed_precision_param", "bfloat16"),
    }
    (root / "one").mkdir()
    (root / "four").mkdir()
    out1 = dict(zip(one, torchrun_runs(1, list(one.values()), root / "one")))
    out4 = dict(zip(four, torchrun_runs(4, list(four.values()), root / "four")))
    return {"root": root, "one": out1, "four": out4, "bases": bases}


def test_lora_trains_matches_one_process_and_resumes_bit_exactly(runs):
    one, four = runs["one"], runs["four"]
    for fam in ("llama", "hyena"):
        losses = one[fam]["losses"]
        assert losses[-1] < losses[0], (fam, losses)
        assert_losses_close(four[fam]["losses"], losses, rtol=1e-5)  # FSDP 2 x TP 2, fp32
    assert_losses_close(one["ac_compile"]["losses"], one["llama"]["losses"], rtol=1e-5)
    assert_losses_close(four["bf16"]["losses"], one["hyena"]["losses"], rtol=2e-2)  # bf16 params, fp32 reduce
    assert one["stop"]["losses"] + one["resume"]["losses"] == one["llama"]["losses"]  # resume: bit-exact
    record = json.loads((runs["root"] / "llama" / "metrics.jsonl").read_text().splitlines()[-1])
    assert 0 < record["trainable_params"] < 0.1 * record["total_params"] and record["optimizer_gib_saved"] > 0
    step = runs["root"] / "llama" / "checkpoint" / "step-4"
    stored = json.loads((step / "model_args.json").read_text())
    assert stored["model_name"] == "llama3"
    keys = read_dcp_metadata(step).state_dict_metadata
    model_keys = [k for k in keys if k.startswith("layers.") or k.startswith(("tok_", "output", "norm"))]
    assert model_keys and all(k.rsplit(".", 1)[-1] in ("lora_a", "lora_b") for k in model_keys)  # adapters only


def _adapted_model(step: Path, base: Path) -> torch.nn.Module:
    """The adapted model as training had it: base weights, then the step's adapters."""
    job = json.loads((step / "job_config.json").read_text())
    c = ConfigManager().parse_args([*TINY, *LORA])
    spec = get_train_spec("llama3")
    model = meta_model(spec, model_args_from_config(spec, c))
    apply_lora(model, c.lora)
    model.to_empty(device=CPU)
    with torch.no_grad():
        model.init_weights(buffer_device=CPU, seed=job["training"]["seed"])
        init_lora(model, 0)
    load_model_weights([model], base, strict_shapes=False)
    load_model_weights([model], step, trainable_only=True)
    return model.eval()


def test_merged_export_scores_like_the_adapted_model_and_loads_in_transformers(runs, tmp_path):
    transformers = pytest.importorskip("transformers")
    step = runs["root"] / "llama" / "checkpoint" / "step-4"
    merged = merge_lora(step, tmp_path / "merged")
    torch.manual_seed(2)
    sequences = [torch.randint(0, 256, (n,)).tolist() for n in (48, 9)]
    adapted = score_sequences(_adapted_model(step, runs["bases"]["llama"]), sequences, CPU)
    base = score_sequences(load_model(runs["bases"]["llama"], CPU), sequences, CPU)
    ours = score_sequences(load_model(merged, CPU), sequences, CPU)
    diff = max(abs(a - b) for s, t in zip(ours, adapted) for a, b in zip(s, t))
    moved = max(abs(a - b) for s, t in zip(base, adapted) for a, b in zip(s, t))
    assert diff <= 1e-5 and moved > 1e-4, (diff, moved)  # the adapters did change the model; the merge keeps it

    dcp_to_llama(merged, tmp_path / "hf", fmt="hf")
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf", torch_dtype=torch.float32).eval()
    with torch.no_grad():
        ids = torch.tensor([sequences[0]])
        ref = torch.log_softmax(hf(ids).logits.float()[0, :-1], -1).gather(-1, ids[0, 1:, None]).squeeze(-1)
    assert (torch.tensor(ours[0]) - ref).abs().max().item() <= 1e-5

    half = merge_lora(step, tmp_path / "merged_bf16", dtype="bfloat16")
    stored = dcp.FileSystemReader(str(half)).read_metadata().state_dict_metadata
    assert {m.properties.dtype for m in stored.values() if hasattr(m, "properties")} == {torch.bfloat16}
    rounded = score_sequences(load_model(half, CPU), sequences, CPU)
    assert max(abs(a - b) for s, t in zip(rounded, ours) for a, b in zip(s, t)) <= 0.05  # bf16 weights
