"""Finding the models the app can offer: a models folder, the Hugging Face cache, the bundled demo."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

DEMO = "demo"  # what `rg_mlx.load` accepts for the bundled demo model, once it ships


def demo_available() -> bool:
    """Whether this install ships the bundled demo model (`rg_mlx.demo`, with its weights)."""
    if importlib.util.find_spec("rg_mlx.demo") is None:
        return False
    from rg_mlx.demo import model_path

    return is_model_folder(model_path())


def is_model_folder(path: str | Path) -> bool:
    """A folder `rg_mlx.load` can chat with: a RecurrentGemma config.json, safetensors and tokenizer.model."""
    folder = Path(path)
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return (
        isinstance(config, dict)
        and config.get("model_type") == "recurrent_gemma"
        and (folder / "tokenizer.model").is_file()
        and any(folder.glob("*.safetensors"))
    )


def models_in_folder(folder: str | Path) -> dict[str, str]:
    """`{label: path}` for `folder` itself and its direct subfolders that are model folders."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        return {}
    candidates = [folder, *sorted(p for p in folder.iterdir() if p.is_dir())]
    return {p.name: str(p) for p in candidates if is_model_folder(p)}


def models_in_hf_cache(cache_dir: str | Path | None = None) -> dict[str, str]:
    """`{repo_id: snapshot path}` for RecurrentGemma models in the Hugging Face cache (none if it is missing)."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        cache = scan_cache_dir(cache_dir)
    except (CacheNotFound, OSError, ValueError):
        return {}
    found = {}
    for repo in sorted(cache.repos, key=lambda r: r.repo_id):
        if repo.repo_type != "model":
            continue
        revisions = sorted(repo.revisions, key=lambda r: r.last_modified, reverse=True)
        for rev in revisions:
            if is_model_folder(rev.snapshot_path):
                label = repo.repo_id if len(revisions) == 1 else f"{repo.repo_id}@{rev.commit_hash[:7]}"
                found[label] = str(rev.snapshot_path)
    return found


def list_models(models_dir: str | Path | None = None, current: str | None = None) -> dict[str, str]:
    """All models to offer, `{label: what rg_mlx.load accepts}`: the current one, the demo, a folder, the cache."""
    found: dict[str, str] = {}
    if demo_available():
        found["demo (bundled)"] = DEMO
    if models_dir:
        found.update(models_in_folder(models_dir))
    found.update(models_in_hf_cache())
    if current:  # listed first, and only once
        found = {model_label(current): current, **{k: v for k, v in found.items() if v != current}}
    return found


def model_label(path: str) -> str:
    """A short name for a model: the demo, a hub repo id, or a folder's name."""
    if path == DEMO:
        return "demo (bundled)"
    p = Path(path)
    if p.parent.name == "snapshots":  # a Hugging Face cache snapshot: models--org--name/snapshots/<hash>
        return p.parent.parent.name.removeprefix("models--").replace("--", "/")
    return p.name if p.exists() else path
