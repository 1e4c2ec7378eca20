"""Hugging Face Hub export: model card, token check, upload.

The token comes from ``HF_TOKEN`` or ``huggingface-cli login`` (``huggingface_hub.get_token``)
and is never logged. It is checked before any conversion work, so a missing login costs seconds.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from huggingface_hub import HfApi, get_token
from huggingface_hub.utils import validate_repo_id

from torchtitan_hyena.errors import UserError
from torchtitan_hyena.models.llama3.args import Llama3Args


def require_token(repo_name: str) -> str:
    """The Hub token for a push to ``repo_name``, with one-line errors for a bad name or a missing login."""
    try:
        validate_repo_id(repo_name)
    except Exception as e:
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"--hf_repo_name {repo_name!r} is not a valid repo id (user/name): {detail}") from None
    token = get_token()
    if not token:
        raise UserError("--push_to_hub needs a Hugging Face token: set HF_TOKEN or run `huggingface-cli login`")
    return token


def push_folder(folder: Path, repo_name: str, token: str, private: bool = False) -> str:
    """Create ``repo_name`` if needed and upload ``folder`` as one commit; returns the commit URL."""
    api = HfApi(token=token)
    try:
        api.create_repo(repo_name, repo_type="model", private=private, exist_ok=True)
        commit = api.upload_folder(
            repo_id=repo_name,
            repo_type="model",
            folder_path=str(folder),
            commit_message=f"Upload {folder.name} from torchtitan_hyena dcp_to_llama.py",
        )
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else ""
        raise UserError(
            f"push to {repo_name} failed ({type(e).__name__}: {first}); the export is complete in {folder}, "
            f"retry with `huggingface-cli upload {repo_name} {folder}`"
        ) from None
    return str(getattr(commit, "commit_url", commit))


def write_model_card(
    folder: Path, args: Llama3Args, flavor: str, fmt: str, dtype: torch.dtype, step_dir: Path, repo_name: str = ""
) -> None:
    """README.md with the architecture, how to load it, and the training config of the step folder."""
    job_config = step_dir / "job_config.json"
    config = json.loads(job_config.read_text()) if job_config.is_file() else None
    step = step_dir.name
    title = repo_name or folder.name
    if fmt == "hf":
        load = f'LlamaForCausalLM.from_pretrained("{title}")'
        usage = f"```python\nfrom transformers import LlamaForCausalLM\nmodel = {load}\n```"
    else:
        usage = "Meta layout: `consolidated.00.pth` + `params.json` (Meta's reference code, or `llama_to_dcp.py`)."
    dtype_name = str(dtype).removeprefix("torch.")
    rope = "none" if args.rope_scaling == "none" else f"llama3 (factor {args.rope_scaling_factor})"
    lines = [
        "---",
        *(["library_name: transformers"] if fmt == "hf" else []),
        "tags: [llama, torchtitan_hyena]",
        "---",
        f"# {title}",
        "",
        f"Llama 3 model (flavor `{flavor}`) exported from `{step}` by torchtitan_hyena's `dcp_to_llama.py`.",
        "",
        "| dim | layers | heads | KV heads | FFN | vocab | max seq | RoPE theta | RoPE scaling | dtype |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        f"| {args.dim} | {args.n_layers} | {args.n_heads} | {args.kv_heads} | {args.ffn_hidden_dim} | "
        f"{args.vocab_size} | {args.max_seq_len} | {args.rope_theta:g} | {rope} | {dtype_name} |",
        "",
        usage,
        "",
        "## Training configuration",
        "",
    ]
    if config is None:
        lines.append("No training configuration was recorded with this checkpoint (e.g. a converted checkpoint).")
    else:
        lines += ["```json", json.dumps(config, indent=2, sort_keys=True), "```"]
    (folder / "README.md").write_text("\n".join(lines) + "\n")
