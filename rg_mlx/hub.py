"""The Hugging Face hub, in one place: what a repo id looks like, downloading a model repo into the normal
hub cache, uploading a folder, and the one-line `RGError` for each way they fail (gated, missing, offline,
HTTP). `rg_mlx.load` and `rg-mlx convert` both fetch through `download`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

from .errors import RGError, first_line

# What a model needs from a repo: config.json and generation_config.json, the safetensors (and their index),
# the SentencePiece model. Not the PyTorch or GGUF copies some repos also hold.
MODEL_FILES = ("*.json", "*.safetensors", "tokenizer.model")
_REPO_ID = re.compile(r"[\w.-]+/[\w.-]+")


def is_repo_id(text: str) -> bool:
    """Whether `text` reads as a hub repo id (``"org/name"``), not as a relative path such as ``./a/b``."""
    return bool(_REPO_ID.fullmatch(text)) and not text.startswith((".", "~"))


def download(repo_id: str, files: Sequence[str] = MODEL_FILES) -> Path:
    """The local snapshot of hub repo `repo_id`: the files matching the `files` patterns, downloaded into the
    Hugging Face cache if needed (HF_TOKEN honoured); with `HF_HUB_OFFLINE=1`, from the cache only."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(repo_id, allow_patterns=list(files)))
    except GatedRepoError:
        raise RGError(
            f"{repo_id}: gated on the Hugging Face hub: accept its license on https://huggingface.co/{repo_id} "
            "and log in (`hf auth login`, or set HF_TOKEN)"
        ) from None
    except RepositoryNotFoundError:
        raise RGError(
            f"{repo_id}: no such repo on the Hugging Face hub (or it is private: log in with `hf auth login`)"
        ) from None
    except LocalEntryNotFoundError:
        raise RGError(
            f"{repo_id}: not in the Hugging Face cache and the hub is unreachable or offline (HF_HUB_OFFLINE): "
            f"download it online (`hf download {repo_id}`), or use a local folder (`rg-mlx convert` makes one)"
        ) from None
    except (HfHubHTTPError, OSError) as e:
        raise RGError(f"{repo_id}: download failed ({first_line(e)}); retry, or use a local folder") from None


def check_upload_repo(repo_id: str) -> None:
    """Fail early, before any slow work, if `repo_id` cannot be uploaded to: not ``"org/name"``, or offline."""
    from huggingface_hub import constants
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise RGError(f"--upload-repo {repo_id!r} is not a valid hub repo id: use ORG/NAME") from None
    if "/" not in repo_id:
        raise RGError(f"--upload-repo {repo_id!r} needs an owner: use ORG/NAME (or YOUR_USER/NAME)")
    if constants.HF_HUB_OFFLINE:
        raise RGError("--upload-repo needs the network but HF_HUB_OFFLINE is set: unset it, or upload later")


def upload(folder: Path, repo_id: str) -> None:
    """Create hub repo `repo_id` if needed and upload `folder` into it."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    try:
        api = HfApi()
        api.create_repo(repo_id, exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model")
    except (HfHubHTTPError, OSError) as e:
        raise RGError(
            f"upload to {repo_id} failed ({first_line(e)}); the converted folder is at {folder}: "
            f"retry with `hf upload {repo_id} {folder}`"
        ) from None
