"""Conversion benchmark: wall time and peak resident memory converting a ~1B-parameter checkpoint.

    python benchmarks/bench_convert.py [--keep DIR]

Builds a random RecurrentGemma checkpoint (width 2048, 10 layers, vocab 256000: 1.03B
parameters, bfloat16, largest tensor the 1 GiB embedding) as a Hugging Face folder and as a
DeepMind `.pt`, then converts each in a fresh subprocess and reports the wall time and the
peak RSS (`getrusage`) of that process. The bound to compare with: twice the largest tensor
plus a fixed overhead (the Python + MLX + torch imports, measured as the baseline).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIG = dict(
    model_type="recurrent_gemma",
    vocab_size=256000,
    hidden_size=2048,
    intermediate_size=2 * 6144,
    num_hidden_layers=10,
    num_attention_heads=8,
    block_types=["recurrent", "recurrent", "attention"],
)

MAKE = """
import json, sys
from pathlib import Path
import mlx.core as mx
from mlx.utils import tree_flatten
from rg_mlx import Model, ModelArgs

folder = Path(sys.argv[1])
args = ModelArgs.from_dict(json.loads(sys.argv[2]))
params = tree_flatten(Model(args).parameters())
shards, weight_map = [{}], {}
for name, p in params:  # ~500 MB shards, so building the checkpoint stays small too
    if sum(a.nbytes for a in shards[-1].values()) > 500 << 20:
        shards.append({})
    shards[-1][name] = (mx.random.normal(p.shape) * 0.02).astype(mx.bfloat16)
    mx.eval(shards[-1][name])
(folder / "hf").mkdir()
for i, shard in enumerate(shards):
    file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    mx.save_safetensors(str(folder / "hf" / file), shard)
    weight_map.update({k: file for k in shard})
(folder / "hf" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
(folder / "hf" / "config.json").write_text(json.dumps(args.to_dict()))
print(sum(p.size for _, p in params), max(p.size for _, p in params) * 2)
"""

# The same weights as a DeepMind PyTorch state_dict (the inverse of the converter's mapping).
TO_PT = """
import sys, torch
from pathlib import Path
from safetensors.torch import load_file
folder = Path(sys.argv[1])
hf = {}
for f in sorted((folder / "hf").glob("*.safetensors")):
    hf.update(load_file(f))
n = max(int(k.split(".")[2]) for k in hf if k.startswith("model.layers.")) + 1
dm = {"embedder.input_embedding": hf["model.embed_tokens.weight"], "final_norm.scale": hf["model.final_norm.weight"]}
for i in range(n):
    h, d = f"model.layers.{i}", f"blocks.{i}"
    g = lambda s: hf[f"{h}.{s}"]
    dm[f"{d}.temporal_pre_norm.scale"] = g("temporal_pre_norm.weight")
    dm[f"{d}.channel_pre_norm.scale"] = g("channel_pre_norm.weight")
    dm[f"{d}.mlp_block.ffw_up.w"] = torch.stack([g("mlp_block.gate_proj.weight").T, g("mlp_block.up_proj.weight").T])
    biases = [g("mlp_block.gate_proj.bias"), g("mlp_block.up_proj.bias")]
    dm[f"{d}.mlp_block.ffw_up.b"] = torch.stack(biases)[:, None, None]
    dm[f"{d}.mlp_block.ffw_down.weight"] = g("mlp_block.down_proj.weight")
    dm[f"{d}.mlp_block.ffw_down.bias"] = g("mlp_block.down_proj.bias")
    if f"{h}.temporal_block.linear_x.weight" in hf:
        r = f"{d}.recurrent_block"
        for s in ("linear_x", "linear_y", "linear_out"):
            dm[f"{r}.{s}.weight"], dm[f"{r}.{s}.bias"] = g(f"temporal_block.{s}.weight"), g(f"temporal_block.{s}.bias")
        dm[f"{r}.conv_1d.w"] = g("temporal_block.conv_1d.weight")[:, :, 0].T
        dm[f"{r}.conv_1d.b"] = g("temporal_block.conv_1d.bias")
        dm[f"{r}.rg_lru.a_param"] = g("temporal_block.rg_lru.recurrent_param")
        for ours, theirs in (("input_gate", "input_gate"), ("recurrent_gate", "a_gate")):
            dm[f"{r}.rg_lru.{theirs}.w"] = g(f"temporal_block.rg_lru.{ours}_weight")
            dm[f"{r}.rg_lru.{theirs}.b"] = g(f"temporal_block.rg_lru.{ours}_bias")
    else:
        a = f"{d}.attention_block"
        for ours, theirs in (("q_proj", "proj_q"), ("k_proj", "proj_k"), ("v_proj", "proj_v")):
            dm[f"{a}.{theirs}.weight"] = g(f"temporal_block.{ours}.weight")
        dm[f"{a}.proj_final.weight"] = g("temporal_block.o_proj.weight")
        dm[f"{a}.proj_final.bias"] = g("temporal_block.o_proj.bias")
torch.save({k: v.contiguous() for k, v in dm.items()}, folder / "model.pt")
"""

# Peak RSS from getrusage; peak anonymous (private) memory sampled from /proc, since a .pt is
# memory-mapped and its file pages, which the kernel can drop at any time, count in RSS.
MEASURE = """
import json, resource, sys, threading, time
import huggingface_hub, sentencepiece  # noqa: F401  (the fixed overhead: imports)
from rg_mlx.convert import convert
{imports}
anon = [0]
def sample():
    while True:
        with open("/proc/self/status") as f:
            kib = next(int(l.split()[1]) for l in f if l.startswith("RssAnon"))
        anon[0] = max(anon[0], kib)
        time.sleep(0.005)
threading.Thread(target=sample, daemon=True).start()
t0 = time.perf_counter()
if {run}:
    kwargs = json.loads(sys.argv[3])
    r = convert(sys.argv[1], sys.argv[2], **kwargs)
    extra = dict(bits_per_weight=r.bits_per_weight, size_bytes=r.size_bytes)
else:
    extra = {{}}
seconds = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
time.sleep(0.05)
print(json.dumps(dict(seconds=seconds, peak_kib=peak, anon_kib=anon[0], **extra)))
"""


def gib(kib: int) -> str:
    return f"{kib / 2**20:.2f} GiB"


def big_tokenizer(path: Path, tests: str, vocab_size: int) -> None:
    """The tests' tiny SentencePiece model padded with unused pieces to `vocab_size` (convert checks the size)."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    sys.path.insert(0, tests)
    from conftest import train_tiny_tokenizer

    proto = pb.ModelProto()
    proto.ParseFromString(train_tiny_tokenizer(path.parent / "tiny_tokenizer").read_bytes())
    while len(proto.pieces) < vocab_size:
        piece = proto.pieces.add()
        piece.piece, piece.type = f"<unused{len(proto.pieces)}>", pb.ModelProto.SentencePiece.USER_DEFINED
    path.write_bytes(proto.SerializeToString())


def measure(source: Path, output: Path, kwargs: dict, torch: bool, run: bool = True) -> dict:
    code = MEASURE.format(imports="import torch  # noqa: F401" if torch else "", run=run)
    out = subprocess.run(
        [sys.executable, "-c", code, str(source), str(output), json.dumps(kwargs)],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=Path, help="build the checkpoint in this folder and keep it (reused if there)")
    parser.add_argument("--layers", type=int, default=CONFIG["num_hidden_layers"], help="fewer for a quick check")
    parser.add_argument("--vocab", type=int, default=CONFIG["vocab_size"], help="smaller for a quick check")
    args = parser.parse_args()
    config = {**CONFIG, "num_hidden_layers": args.layers, "vocab_size": args.vocab}
    tmp = None if args.keep else tempfile.TemporaryDirectory()
    folder = args.keep or Path(tmp.name)
    folder.mkdir(parents=True, exist_ok=True)
    tests = str(Path(__file__).resolve().parents[1] / "tests")

    t0 = time.perf_counter()
    if not (folder / "info.json").exists():
        made = subprocess.run([sys.executable, "-c", MAKE, str(folder), json.dumps(config)], check=True,
                              capture_output=True, text=True)
        params, largest = map(int, made.stdout.split())
        subprocess.run([sys.executable, "-c", TO_PT, str(folder)], check=True)
        big_tokenizer(folder / "tokenizer.model", tests, config["vocab_size"])
        (folder / "info.json").write_text(json.dumps([params, largest]))
    params, largest = json.loads((folder / "info.json").read_text())
    print(f"checkpoint: {params / 1e9:.3f}B parameters, bfloat16, largest tensor {largest / 2**30:.2f} GiB "
          f"(built in {time.perf_counter() - t0:.0f} s)")

    cases = [
        ("HF safetensors -> bfloat16", folder / "hf", {}, False),
        ("HF safetensors -> 4-bit", folder / "hf", {"quantize": True}, False),
        ("DeepMind .pt -> bfloat16", folder / "model.pt", {}, True),
    ]
    print(f"{'case':28s} {'wall s':>7s} {'peak RSS':>9s} {'peak anon':>9s} {'imports':>8s} {'bits/w':>6s} "
          f"{'on disk':>8s}")
    for name, source, kwargs, torch in cases:
        base = measure(source, folder / "unused", {}, torch, run=False)
        out = folder / "out"
        r = measure(source, out, {**kwargs, "force": True, "tokenizer": str(folder / "tokenizer.model")}, torch)
        print(
            f"{name:28s} {r['seconds']:7.1f} {gib(r['peak_kib']):9s} {gib(r['anon_kib']):9s} "
            f"{gib(base['peak_kib']):8s} {r['bits_per_weight']:6.2f} {r['size_bytes'] / 2**30:4.2f} GiB"
        )
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
