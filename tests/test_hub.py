"""rg_mlx.hub: every way a download fails becomes one line naming the fix, for the loader and the converter."""

from __future__ import annotations

import huggingface_hub
import pytest
from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

from rg_mlx import RGError, hub, load
from rg_mlx.convert import convert


def _error(cls, message: str) -> Exception:
    """A hub exception as huggingface_hub raises it (its HTTP errors need a live response to construct)."""
    e = cls.__new__(cls)
    e.args = (message,)
    return e


FAILURES = {
    "gated": (_error(GatedRepoError, "403 Client Error\ncannot access gated repo"), "gated on the Hugging Face hub: "
              "accept its license on https://huggingface.co/org/model and log in"),
    "missing": (_error(RepositoryNotFoundError, "404 Client Error\nRepository Not Found"), "no such repo on the "
                "Hugging Face hub \\(or it is private"),
    "offline": (LocalEntryNotFoundError("cannot find the requested files in the disk cache"),
                "not in the Hugging Face cache and the hub is unreachable or offline .*hf download org/model"),
    "http": (_error(HfHubHTTPError, "500 Server Error: boom\nmore detail"), "download failed \\(500 Server Error: "
             "boom\\); retry"),
    "network": (ConnectionResetError("connection reset by peer"), "download failed \\(connection reset by peer\\)"),
}


@pytest.mark.parametrize("case", list(FAILURES))
def test_download_errors_are_one_line_for_loader_and_converter(case, monkeypatch, tmp_path):
    error, message = FAILURES[case]
    calls = []

    def snapshot_download(repo_id, allow_patterns):
        calls.append((repo_id, allow_patterns))
        raise error

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    for entry in (lambda: load("org/model"), lambda: convert("org/model", tmp_path / "out")):
        with pytest.raises(RGError, match=f"^org/model: {message}") as e:
            entry()
        assert "\n" not in str(e.value)
    # Both ask for the same files.
    assert calls == [("org/model", list(hub.MODEL_FILES))] * 2
    assert not (tmp_path / "out").exists()


def test_repo_ids_and_paths():
    assert hub.is_repo_id("google/recurrentgemma-2b-it") and hub.is_repo_id("me/my.model_v2")
    for text in ("./a/b", "~/models/x", "a/b/c", "rg-2b-it", "/abs/path", "a b/c"):
        assert not hub.is_repo_id(text), text


def test_a_path_that_is_no_repo_id_says_so(tmp_path):
    with pytest.raises(RGError, match="no such model folder .*hub repo id"):
        load(str(tmp_path / "a" / "b" / "c"))
    with pytest.raises(RGError, match="no such file or folder .*not a hub repo id"):
        convert(tmp_path / "a" / "b" / "c", tmp_path / "out")
