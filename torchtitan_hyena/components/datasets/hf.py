"""Opening Hugging Face datasets by repo id or local folder, with one-line errors."""

from __future__ import annotations

from pathlib import Path

from torchtitan_hyena.errors import UserError


def looks_like_repo_id(path: str) -> bool:
    parts = path.split("/")
    return len(parts) == 2 and all(parts) and not path.startswith((".", "/", "~"))


def load_hf_split(path: str, split: str):
    """A map-style (memory-mapped Arrow) ``datasets.Dataset`` for ``split`` of ``path``.

    ``path`` is a local folder (``save_to_disk`` output, or data files in the hub layout) or a
    repo id already in the local HF cache (clusters run with ``HF_HUB_OFFLINE=1``).
    """
    import datasets

    local = Path(path).expanduser()
    if not local.exists() and not looks_like_repo_id(path):
        raise UserError(f"training.dataset_path {path} does not exist; give a local folder or an HF repo id")
    try:
        if local.is_dir() and ((local / "dataset_dict.json").exists() or (local / "state.json").exists()):
            loaded = datasets.load_from_disk(str(local))
            if isinstance(loaded, datasets.DatasetDict):
                if split not in loaded:
                    raise UserError(f"dataset {path} has no split {split!r}; splits: {', '.join(loaded)}")
                return loaded[split]
            return loaded
        return datasets.load_dataset(str(local) if local.exists() else path, split=split)
    except UserError:
        raise
    except ValueError as e:
        if "split" in str(e).lower():
            raise UserError(f"dataset {path} has no split {split!r} ({str(e).splitlines()[0]})") from None
        raise UserError(f"could not load dataset {path}: {str(e).splitlines()[0]}") from None
    except (FileNotFoundError, ConnectionError, OSError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(
            f"could not load dataset {path} ({msg}); on clusters download it first and set HF_HOME / HF_HUB_OFFLINE=1"
        ) from None
