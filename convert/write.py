"""Writing a converted folder: streamed safetensors shards, config, generation config, model card.

Safetensors puts every tensor's offset in a header before the data. The shapes and dtypes
of the output are known before any tensor is read, so each shard's header is written first
and the tensors follow one at a time: no more than one tensor is ever held in memory.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import mlx.core as mx
import numpy as np

from rg_mlx.errors import RGError

MAX_SHARD_BYTES = 5 << 30
INDEX_FILE = "model.safetensors.index.json"
_CODES = {mx.float32: "F32", mx.float16: "F16", mx.bfloat16: "BF16", mx.uint32: "U32", mx.uint8: "U8"}
_UINT = {2: mx.uint16, 4: mx.uint32}  # same-size integer views: NumPy has no bfloat16


@dataclass(frozen=True)
class TensorSpec:
    """One output tensor: name, shape and dtype, known before its data."""

    name: str
    shape: tuple[int, ...]
    dtype: mx.Dtype

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.size


def plan_shards(specs: list[TensorSpec], max_bytes: int = MAX_SHARD_BYTES) -> list[list[TensorSpec]]:
    """Split `specs` in order into shards of at most `max_bytes` (a larger tensor gets a shard of its own)."""
    shards: list[list[TensorSpec]] = []
    size = 0
    for spec in specs:
        if not shards or size + spec.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


class WeightsWriter:
    """Writes planned tensors, in plan order, into `model.safetensors` or `model-0000k-of-0000N.safetensors`.

    `close()` writes `model.safetensors.index.json` and returns the shard file names.
    """

    def __init__(self, folder: Path, specs: list[TensorSpec], max_shard_bytes: int = MAX_SHARD_BYTES):
        self.folder = folder
        shards = plan_shards(specs, max_shard_bytes)
        n = len(shards)
        self.files = (
            ["model.safetensors"] if n == 1 else [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
        )
        self._pending = list(zip(self.files, shards))
        self._queue: list[TensorSpec] = []
        self._file: BinaryIO | None = None
        self.weight_map: dict[str, str] = {}
        self.total_bytes = sum(s.nbytes for s in specs)

    def write(self, name: str, array: mx.array) -> None:
        """Append tensor `name` (the next one in the plan) to the current shard."""
        if not self._queue:
            self._open_next()
        spec = self._queue.pop(0)
        if (name, tuple(array.shape), array.dtype) != (spec.name, spec.shape, spec.dtype):
            raise RGError(
                f"internal error: wrote {name} {tuple(array.shape)} {array.dtype}, planned "
                f"{spec.name} {spec.shape} {spec.dtype}"
            )
        if array.dtype.size in _UINT:
            array = array.view(_UINT[array.dtype.size])
        self._file.write(np.ascontiguousarray(array).data)
        if not self._queue:
            self._file.close()
            self._file = None

    def _open_next(self) -> None:
        if not self._pending:
            raise RGError("internal error: more tensors written than planned")
        file, self._queue = self._pending.pop(0)
        header: dict[str, Any] = {"__metadata__": {"format": "mlx"}}
        offset = 0
        for spec in self._queue:
            header[spec.name] = {
                "dtype": _CODES[spec.dtype],
                "shape": list(spec.shape),
                "data_offsets": [offset, offset + spec.nbytes],
            }
            offset += spec.nbytes
            self.weight_map[spec.name] = file
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
        self._file = open(self.folder / file, "wb")
        self._file.write(struct.pack("<Q", len(raw)) + raw)

    def close(self, metadata: dict[str, Any]) -> list[str]:
        """Check that every planned tensor was written, then write the index."""
        if self._queue or self._pending:
            raise RGError("internal error: conversion ended before every planned tensor was written")
        index = {
            "metadata": {"total_size": self.total_bytes, **metadata},
            "weight_map": dict(sorted(self.weight_map.items())),
        }
        (self.folder / INDEX_FILE).write_text(json.dumps(index, indent=4))
        return self.files

    def abort(self) -> None:
        """Close an open shard file after a failure (the caller removes the folder)."""
        if self._file is not None:
            self._file.close()
            self._file = None


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=4, sort_keys=True) + "\n")


def write_generation_config(folder: Path, bos_id: int | None, eos_ids: list[int], pad_id: int | None) -> None:
    """`generation_config.json`: stop on every eos id (`<eos>` and `<end_of_turn>`); ids the tokenizer lacks
    are left out."""
    ids = {"bos_token_id": bos_id, "eos_token_id": eos_ids, "pad_token_id": pad_id}
    write_json(folder / "generation_config.json", {k: v for k, v in ids.items() if v is not None})


def write_model_card(folder: Path, *, name: str, base_model: str | None, description: str, chat: bool = False) -> None:
    """`README.md`: a Hugging Face model card (`library_name: mlx`) saying how to install rg-mlx and run the model
    (`chat`: an instruction-tuned model, whose folder has Gemma's chat template)."""
    from huggingface_hub import ModelCard, ModelCardData

    data = ModelCardData(
        library_name="mlx",
        base_model=base_model,
        license="gemma",
        pipeline_tag="text-generation",
        tags=["mlx", "rg-mlx", "recurrentgemma", "griffin"],
    )
    if chat:
        usage = (
            "`rg-mlx generate` gives the prompt to this instruction-tuned model as a user turn of Gemma's chat "
            "format (`--raw` sends it as plain text); in Python, pass the conversation as messages."
        )
        prompt = '[{"role": "user", "content": "Why is the sky blue?"}]'
    else:
        usage = (
            "This is a pretrained (base) model: it continues text. `rg-mlx generate` gives it the prompt as "
            "plain text (`--chat` puts it in Gemma's chat format)."
        )
        prompt = '"The sky is blue because"'
    text = f"""---
{data.to_yaml()}
---

# {name}

{description}, converted with rg-mlx (RecurrentGemma on Apple MLX, exact to DeepMind's reference).

## Install rg-mlx

rg-mlx is not published on PyPI yet: install it from a clone of its repository, in the clone's folder:

```bash
pip install -e .
```

## Run it

```bash
rg-mlx chat --model {name}
rg-mlx generate --model {name} -p "Why is the sky blue?"
```

{usage}

```python
import rg_mlx

model, tokenizer = rg_mlx.load("{name}")
print(rg_mlx.generate(model, tokenizer, {prompt}))
```

The folder is also an mlx-lm model (`mlx_lm.generate --model {name}`, `mlx_lm.utils.load_model`), and its tokenizer
files load in Hugging Face's `AutoTokenizer`.
"""
    ModelCard(text).save(folder / "README.md")
