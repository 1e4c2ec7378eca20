"""Tiny Llama checkpoints for converter tests, built here (no download) in HF and Meta formats.

The Meta files are derived from the HF weights independently of the converter: q/k rows are put
back in Meta's interleaved-pair order by explicit indices, keys renamed, and tensors split the way
Meta's model-parallel checkpoints are (ColumnParallel rows, RowParallel columns, norms replicated).
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import torch
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from torchtitan_hyena.components.dcp_reader import load_dcp, read_dcp_metadata

_RENAME = {
    "self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk", "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo", "mlp.gate_proj": "feed_forward.w1", "mlp.up_proj": "feed_forward.w3",
    "mlp.down_proj": "feed_forward.w2", "input_layernorm": "attention_norm", "post_attention_layernorm": "ffn_norm",
}  # fmt: skip
_SPLIT_ROWS = ("wq.weight", "wk.weight", "wv.weight", "w1.weight", "w3.weight", "output.weight")
_SPLIT_COLS = ("wo.weight", "w2.weight")

# Meta-style params of the default tiny model: 1.3 x int(8 * 64 / 3) = 221, rounded up to 16 -> 224.
TINY = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=320, multiple_of=16, ffn_dim_multiplier=1.3)


def tiny_hf_model(seed: int = 0, rope_scaling: bool = True, **overrides):
    """A random ``LlamaForCausalLM`` with GQA and Llama-3.1 RoPE scaling, weights large enough that a
    wrong RoPE layout or scaling shows far above 1e-5 in the log-probs."""
    from transformers import LlamaConfig, LlamaForCausalLM

    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192} if rope_scaling else {"rope_type": "default"}  # fmt: skip
    kwargs = dict(
        vocab_size=TINY["vocab_size"], hidden_size=TINY["dim"], intermediate_size=224,
        num_hidden_layers=TINY["n_layers"], num_attention_heads=TINY["n_heads"],
        num_key_value_heads=TINY["n_kv_heads"], max_position_embeddings=131072, rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    )  # fmt: skip
    kwargs.update(overrides)
    if "rope_parameters" in inspect.signature(LlamaConfig).parameters:  # transformers 5
        config = LlamaConfig(rope_parameters={**rope, "rope_theta": 10000.0}, **kwargs)
    else:  # transformers 4.x
        config = LlamaConfig(rope_theta=10000.0, rope_scaling=rope if rope_scaling else None, **kwargs)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0, 0.15)
    return model


@torch.no_grad()
def hf_logprobs(model, sequences: list[list[int]]) -> list[torch.Tensor]:
    """``log p(x_t | x_<t)`` for t >= 1 from transformers, one unpadded sequence at a time."""
    out = []
    for seq in sequences:
        ids = torch.tensor([seq])
        logits = model(ids).logits.float()
        out.append(torch.log_softmax(logits[0, :-1], -1).gather(-1, ids[0, 1:, None]).squeeze(-1))
    return out


def meta_state_dict(model) -> dict[str, torch.Tensor]:
    """Meta names and Meta's interleaved RoPE row order, from an HF ``LlamaForCausalLM``."""
    c = model.config
    hd = c.hidden_size // c.num_attention_heads

    def interleave(w: torch.Tensor, heads: int) -> torch.Tensor:  # Meta row h*hd + 2j + p = HF row h*hd + p*hd/2 + j
        idx = [h * hd + p * (hd // 2) + j for h in range(heads) for j in range(hd // 2) for p in range(2)]
        return w[idx]

    sd = {}
    for name, t in model.state_dict().items():
        key = name.removeprefix("model.").replace("embed_tokens", "tok_embeddings").replace("lm_head", "output")
        for hf, meta in _RENAME.items():
            key = key.replace(hf, meta)
        if key.endswith("wq.weight"):
            t = interleave(t, c.num_attention_heads)
        elif key.endswith("wk.weight"):
            t = interleave(t, c.num_key_value_heads)
        sd[key] = t.clone()
    return sd


def save_meta(model, folder: Path, n_shards: int = 1, vocab_parallel: bool = True, scaled_rope: bool = True) -> Path:
    """Write ``params.json`` + ``consolidated.NN.pth``. ``vocab_parallel`` splits tok_embeddings by vocabulary
    (Llama 3's VocabParallelEmbedding), otherwise by embedding dim (Llama 2's ParallelEmbedding)."""
    folder.mkdir(parents=True)
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(n_shards)]
    for key, t in meta_state_dict(model).items():
        if key.endswith(_SPLIT_ROWS) or (key == "tok_embeddings.weight" and vocab_parallel):
            pieces = t.chunk(n_shards, dim=0)
        elif key.endswith(_SPLIT_COLS) or key == "tok_embeddings.weight":
            pieces = t.chunk(n_shards, dim=1)
        else:
            pieces = [t] * n_shards
        for shard, piece in zip(shards, pieces):
            shard[key] = piece.clone()
    for i, shard in enumerate(shards):
        torch.save(shard, folder / f"consolidated.{i:02d}.pth")
    params = {**TINY, "norm_eps": 1e-5, "rope_theta": 10000.0, "use_scaled_rope": scaled_rope}
    (folder / "params.json").write_text(json.dumps(params))
    return folder


def read_dcp(path: Path, skip=("optimizer", "lr_scheduler", "dataloader", "train_state")) -> dict[str, torch.Tensor]:
    """The model tensors of a DCP folder, in their stored dtype."""
    meta = read_dcp_metadata(path).state_dict_metadata
    out = {
        k: torch.empty(tuple(m.size), dtype=m.properties.dtype)
        for k, m in meta.items()
        if isinstance(m, TensorStorageMetadata) and not k.startswith(skip)
    }
    load_dcp(out, path)
    return out
