"""The converter: every published layout in, one MLX folder out; quantization; errors; atomicity."""

from __future__ import annotations

import json
import math
import re
import shutil
from itertools import islice
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import sentencepiece as spm
from mlx.utils import tree_flatten

from rg_mlx import Model, ModelArgs, RGError, load_model
from rg_mlx.cli import main as cli_main
from rg_mlx.convert import convert
from rg_mlx.convert.write import WeightsWriter
from rg_mlx.memory import human_bytes, human_count
from rg_mlx.quant import DEFAULTS, MODES, QuantSpec

from conftest import train_tiny_tokenizer
from reference import dm_to_hf, hf_config, reference_logits, reference_model, save_hf_folder

WINDOW = 8


def logits(folder: Path, tokens: np.ndarray) -> np.ndarray:
    model = load_model(folder, dtype="float32")
    return np.array(model(mx.array(tokens, dtype=mx.int32)))


def leftovers(parent: Path) -> list[str]:
    """Temporary folders a conversion left beside its output."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


@pytest.fixture(scope="module")
def deepmind(tmp_path_factory, tiny_tokenizer_path):
    """One DeepMind reference model saved as a `.pt` (with tokenizer) and in HF layout (2B hub spelling too)."""
    import torch

    model, config = reference_model(
        vocab_size=400,
        width=64,
        mlp_expanded_width=96,
        num_heads=4,
        lru_width=96,
        block_types=("recurrent", "recurrent", "attention", "recurrent"),
        window=WINDOW,
    )
    root = tmp_path_factory.mktemp("deepmind")
    (root / "pt").mkdir()
    torch.save(model.state_dict(), root / "pt" / "griffin.pt")
    shutil.copy(tiny_tokenizer_path, root / "pt" / "tokenizer.model")

    weights = dm_to_hf(model.state_dict(), config)
    save_hf_folder(root / "hf", config, weights)
    shutil.copy(tiny_tokenizer_path, root / "hf" / "tokenizer.model")

    # The 2B hub repo's spelling: `_block_types`, top-level rope_theta / partial_rotary_factor.
    shutil.copytree(root / "hf", root / "hub2b")
    c = hf_config(config)
    del c["rope_parameters"]
    c["_block_types"] = c.pop("block_types")
    c.update(rope_theta=10000.0, partial_rotary_factor=0.5, head_dim=16, torch_dtype="float32", attention_bias=False)
    (root / "hub2b" / "config.json").write_text(json.dumps(c))

    tokens = np.random.RandomState(0).randint(0, 400, size=(2, 3 * WINDOW))
    return dict(root=root, model=model, tokens=tokens, reference=reference_logits(model, tokens))


def test_deepmind_pt_and_hf_layout_match_the_reference(deepmind, tmp_path):
    root, tokens, ref = deepmind["root"], deepmind["tokens"], deepmind["reference"]
    from_pt = convert(root / "pt" / "griffin.pt", tmp_path / "from_pt", overrides={"attention_window_size": WINDOW})
    from_hf = convert(root / "hf", tmp_path / "from_hf")
    a, b = logits(from_pt.path, tokens), logits(from_hf.path, tokens)
    np.testing.assert_allclose(a, ref, atol=1e-4, rtol=0)
    np.testing.assert_array_equal(a, b)
    # The config inferred from the .pt's shapes is the HF one: lru_width != width, pattern of 3 over 4 layers.
    args = ModelArgs.from_dict(json.loads((from_pt.path / "config.json").read_text()))
    assert (args.lru_width, args.mlp_width, args.num_attention_heads) == (96, 96, 4)
    assert args.layer_types == ["recurrent", "recurrent", "attention", "recurrent"]
    assert from_pt.parameters == sum(p.numel() for p in deepmind["model"].parameters())
    assert from_pt.dtype == "float32" and from_pt.bits_per_weight == 32.0


def test_folder_contents(deepmind, tmp_path, tiny_tokenizer_path):
    calls = []
    out = convert(deepmind["root"] / "hf", tmp_path / "out", progress=lambda *a: calls.append(a)).path
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md",
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "model.safetensors.index.json",
        "special_tokens_map.json",
        "tokenizer.model",
        "tokenizer_config.json",
    ]
    sp = spm.SentencePieceProcessor(model_file=str(tiny_tokenizer_path))
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [sp.eos_id(), sp.piece_to_id("<end_of_turn>")]
    assert json.loads((out / "config.json").read_text())["eos_token_id"] == gen["eos_token_id"]
    assert (out / "tokenizer.model").read_bytes() == tiny_tokenizer_path.read_bytes()
    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: mlx" in card and "rg_mlx.load" in card
    # rg-mlx is on no package index: the card says how to install it from its repository.
    assert "pip install -e ." in card and "not published on PyPI" in card and "pip install rg-mlx" not in card
    assert "pretrained (base) model" in card  # no chat template here
    # Normalised config: one spelling, with the keys mlx-lm's ModelArgs requires.
    config = json.loads((out / "config.json").read_text())
    assert "rope_parameters" not in config and "_block_types" not in config
    for key in ("attention_bias", "rope_theta", "num_key_value_heads", "block_types", "conv1d_width", "rms_norm_eps"):
        assert key in config
    # Our tensor names and layout: conv [L, 4, 1], no lm_head.
    weights = mx.load(str(out / "model.safetensors"))
    assert weights["model.layers.0.temporal_block.conv_1d.weight"].shape == (96, 4, 1)
    assert not any(k.startswith("lm_head") for k in weights)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(weights) and set(index["weight_map"].values()) == {"model.safetensors"}
    # Progress: once per tensor, ending at every tensor and byte written.
    total = sum(a.nbytes for a in weights.values())
    assert len(calls) == len(weights) and calls[-1] == (len(weights), len(weights), total, total)


def test_hub_2b_spelling_converts_to_the_same_model(deepmind, tmp_path):
    a = convert(deepmind["root"] / "hf", tmp_path / "a").path
    b = convert(deepmind["root"] / "hub2b", tmp_path / "b").path
    assert json.loads((a / "config.json").read_text()) == json.loads((b / "config.json").read_text())
    np.testing.assert_array_equal(logits(a, deepmind["tokens"]), logits(b, deepmind["tokens"]))


def test_transformers_save_pretrained_folder(tmp_path, tiny_tokenizer_path):
    import torch
    from transformers import RecurrentGemmaConfig, RecurrentGemmaForCausalLM

    config = RecurrentGemmaConfig(
        vocab_size=400,
        hidden_size=64,
        intermediate_size=192,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=1,
        attention_window_size=16,
    )
    torch.manual_seed(0)
    hf = RecurrentGemmaForCausalLM(config).eval()
    with torch.no_grad():  # norms and biases start at zero: randomise so the test sees them
        for name, p in hf.named_parameters():
            if name.endswith(("norm.weight", "bias")):
                p.copy_(torch.randn_like(p) * 0.3)
    hf.save_pretrained(tmp_path / "hf")
    assert "rope_parameters" in json.loads((tmp_path / "hf" / "config.json").read_text())  # transformers-5 spelling

    out = convert(tmp_path / "hf", tmp_path / "out", tokenizer=tiny_tokenizer_path).path
    tokens = np.random.RandomState(1).randint(0, 400, size=(2, 12))  # within the window: HF agrees there
    with torch.no_grad():
        expected = hf(torch.tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(logits(out, tokens), expected, atol=1e-4, rtol=0)


def test_mlx_lm_loads_the_converted_folder(tiny_model_dir, tmp_path):
    from mlx_lm.utils import load_model as mlx_lm_load

    tokens = mx.array(np.random.RandomState(2).randint(0, 400, size=(2, 12)), dtype=mx.int32)  # T < window 16
    cases = [("float", {}), ("sharded", {"max_shard_bytes": 40_000}), ("q4", {"quantize": True}),
             ("mxfp4", {"quantize": True, "q_mode": "mxfp4"})]
    for name, kwargs in cases:
        out = convert(tiny_model_dir, tmp_path / name, **kwargs).path
        theirs, _ = mlx_lm_load(out)
        ours = load_model(out, dtype="float32")
        # mlx-lm differs from DeepMind only in its block-norm eps (1e-5 vs 1e-6) this early.
        np.testing.assert_allclose(np.array(theirs(tokens)), np.array(ours(tokens)), atol=1e-4, rtol=0)
    shards = sorted(p.name for p in (tmp_path / "sharded").glob("model-*-of-*.safetensors"))
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(shards) > 2 and sorted(set(index["weight_map"].values())) == shards
    np.testing.assert_array_equal(logits(tmp_path / "sharded", np.array(tokens)),
                                  logits(tmp_path / "float", np.array(tokens)))


@pytest.fixture(scope="module")
def trained_like(tmp_path_factory, tiny_tokenizer_path) -> Path:
    """A tiny random model scaled like a trained one (weights ~ 1/sqrt(fan-in)): close top-2 logits, so
    top-1 agreement is a real test of quantization. Width 128: every layer but down_proj (in 96) divides 64."""
    args = ModelArgs.from_dict(
        dict(
            model_type="recurrent_gemma",
            vocab_size=400,
            hidden_size=128,
            intermediate_size=192,
            num_hidden_layers=3,
            num_attention_heads=4,
            block_types=["recurrent", "recurrent", "attention"],
            attention_window_size=64,
        )
    )
    mx.random.seed(0)
    weights = {}
    for name, p in tree_flatten(Model(args).parameters()):
        if name == "model.embed_tokens.weight":
            scale = 0.05
        elif p.ndim >= 2 and "conv_1d" not in name:
            scale = 1 / math.sqrt(p.shape[-2] if "rg_lru" in name else p.shape[-1])
        else:
            scale = 0.2
        weights[name] = mx.random.normal(p.shape) * scale
    folder = tmp_path_factory.mktemp("trained_like")
    mx.save_safetensors(str(folder / "model.safetensors"), weights)
    (folder / "config.json").write_text(json.dumps(args.to_dict()))
    shutil.copy(tiny_tokenizer_path, folder / "tokenizer.model")
    return folder


def test_quantized_8_and_4_bit(trained_like, tmp_path, capsys):
    from mlx_lm.generate import generate_step

    tokens = np.random.RandomState(3).randint(0, 400, size=(4, 128))
    full = logits(trained_like, tokens).argmax(-1)
    agreement = {}
    for bits in (8, 4):
        out = tmp_path / f"q{bits}"
        assert cli_main(["convert", str(trained_like), str(out), "-q", "--q-bits", str(bits)]) == 0
        summary = capsys.readouterr().out
        config = json.loads((out / "config.json").read_text())
        expected = {"group_size": 64, "bits": bits, "mode": "affine"}
        assert config["quantization"] == config["quantization_config"] == expected

        weights = mx.load(str(out / "model.safetensors"))
        assert weights["model.embed_tokens.weight"].dtype == mx.uint32  # the tied output layer is quantized too
        assert weights["model.layers.0.temporal_block.linear_x.weight"].shape == (128, 128 * bits // 32)
        assert "model.layers.0.mlp_block.down_proj.scales" not in weights  # input 96: not a multiple of 64
        assert "model.layers.0.temporal_block.rg_lru.input_gate_weight.scales" not in weights
        assert weights["model.layers.0.temporal_block.rg_lru.input_gate_weight"].dtype == mx.float32
        # Each quantized weight is within one quantization step of the original.
        original = mx.load(str(trained_like / "model.safetensors"))
        for layer in ("model.embed_tokens", "model.layers.2.temporal_block.q_proj"):
            w, scales = weights[f"{layer}.weight"], weights[f"{layer}.scales"]
            restored = mx.dequantize(w, scales, weights[f"{layer}.biases"], group_size=64, bits=bits)
            error = mx.abs(restored - original[f"{layer}.weight"]).reshape(scales.shape[0], scales.shape[1], 64)
            assert mx.all(error <= mx.abs(scales)[..., None] + 1e-6).item()

        # What the summary reports is what was written.
        float_params = sum(a.size for a in mx.load(str(trained_like / "model.safetensors")).values())
        bpw = 8 * sum(a.nbytes for a in weights.values()) / float_params
        size = (out / "model.safetensors").stat().st_size
        assert f"bits/weight  {bpw:.3f}" in summary and f"({size:,} bytes" in summary
        assert f"({float_params:,})" in summary
        # Sizes people can read, also for a model this small (not "0.000 B" parameters and "0.00 GiB").
        assert f"parameters   {human_count(float_params)} ({float_params:,})" in summary
        assert f"size on disk {human_bytes(size)} ({size:,} bytes, 1 shard)" in summary
        assert human_count(float_params).endswith("K") and human_bytes(size).endswith("KiB")

        model = load_model(out, dtype="float32")
        agreement[bits] = (np.array(model(mx.array(tokens, dtype=mx.int32))).argmax(-1) == full).mean()
        generated = [t for t, _ in islice(generate_step(mx.array(tokens[0, :16], dtype=mx.int32), model), 8)]
        assert len(generated) == 8 and all(0 <= t < 400 for t in generated)
    assert agreement[8] >= 0.98
    assert 0.75 <= agreement[4] < agreement[8]  # 4-bit loses more, but is still the same model


@pytest.mark.parametrize("mode", ["mxfp4", "mxfp8", "nvfp4"])
def test_quantized_fp_modes(trained_like, tmp_path, mode):
    """MLX's floating-point modes: 8-bit exponent scales, no biases; the stored mode is what the loader uses."""
    out = convert(trained_like, tmp_path / mode, quantize=True, q_mode=mode).path
    config = json.loads((out / "config.json").read_text())
    bits, group_size = {"mxfp4": (4, 32), "mxfp8": (8, 32), "nvfp4": (4, 16)}[mode]
    assert config["quantization"] == {"group_size": group_size, "bits": bits, "mode": mode}
    weights = mx.load(str(out / "model.safetensors"))
    original = mx.load(str(trained_like / "model.safetensors"))
    for layer in ("model.embed_tokens", "model.layers.0.mlp_block.down_proj"):  # down_proj: input 96
        packed, scales = mx.quantize(original[f"{layer}.weight"], group_size, bits, mode=mode)
        assert weights[f"{layer}.scales"].dtype == mx.uint8 and f"{layer}.biases" not in weights
        assert mx.array_equal(weights[f"{layer}.weight"], packed) and mx.array_equal(weights[f"{layer}.scales"], scales)

    tokens = np.random.RandomState(3).randint(0, 400, size=(4, 128))
    agreement = (logits(out, tokens).argmax(-1) == logits(trained_like, tokens).argmax(-1)).mean()
    assert agreement >= (0.95 if bits == 8 else 0.8), agreement


def test_hub_repo_id_from_the_local_cache(deepmind, tmp_path, monkeypatch):
    import huggingface_hub

    cache = tmp_path / "hub"
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "models--tiny-org--tiny-griffin"
    shutil.copytree(deepmind["root"] / "hf", repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))

    out = convert("tiny-org/tiny-griffin", tmp_path / "out").path
    np.testing.assert_allclose(logits(out, deepmind["tokens"]), deepmind["reference"], atol=1e-4, rtol=0)
    assert "base_model: tiny-org/tiny-griffin" in (out / "README.md").read_text()

    with pytest.raises(RGError, match="not in the Hugging Face cache and the hub is unreachable or offline"):
        convert("tiny-org/absent", tmp_path / "absent")
    assert not (tmp_path / "absent").exists()


# --- bad input: one-line RGError naming the problem, and no output -------------------------------


def _edit_hf(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    edit(dst)
    return dst


def _edit_weights(change):
    def edit(folder: Path) -> None:
        weights = dict(mx.load(str(folder / "model.safetensors")))
        change(weights)
        mx.save_safetensors(str(folder / "model.safetensors"), weights)

    return edit


def _edit_config(change):
    def edit(folder: Path) -> None:
        config = json.loads((folder / "config.json").read_text())
        change(config)
        (folder / "config.json").write_text(json.dumps(config))

    return edit


def _truncate(folder: Path) -> None:
    f = folder / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])


BAD_HF = {
    "truncated": (_truncate, {}, "truncated or corrupt"),
    "corrupt": (lambda f: (f / "model.safetensors").write_bytes(b"not a safetensors file"), {}, "truncated or corrupt"),
    "no weights": (lambda f: (f / "model.safetensors").unlink(), {}, "no \\*.safetensors"),
    "unknown tensor": (
        _edit_weights(lambda w: w.update({"model.layers.0.extra.weight": mx.zeros((2,))})),
        {},
        "unknown model.layers.0.extra.weight",
    ),
    "missing tensor": (
        _edit_weights(lambda w: w.pop("model.layers.1.mlp_block.up_proj.bias")),
        {},
        "missing model.layers.1.mlp_block.up_proj.bias",
    ),
    "wrong shape": (
        _edit_config(lambda c: c.update(intermediate_size=2 * 128)),
        {},
        "tensor model.layers.0.mlp_block.* has shape \\(.*96.*\\), the config implies \\(.*128.*\\)",
    ),
    "model type": (_edit_config(lambda c: c.update(model_type="gemma")), {}, "model_type is 'gemma'"),
    "vocab mismatch": (
        lambda f: shutil.copy(train_tiny_tokenizer(f / "tok500", vocab_size=500), f / "tokenizer.model"),
        {},
        "tokenizer has 500 pieces but the embedding has 400 rows",
    ),
    "no tokenizer": (lambda f: (f / "tokenizer.model").unlink(), {}, "no tokenizer.model .* --tokenizer"),
    "bad tokenizer": (lambda f: (f / "tokenizer.model").write_bytes(b"junk"), {}, "not a SentencePiece"),
    "dtype": (lambda f: None, {"dtype": "int8"}, "unsupported dtype 'int8'"),
    "bits": (lambda f: None, {"quantize": True, "q_bits": 7}, "unsupported quantization bits 7 for mode affine"),
    "group size": (lambda f: None, {"quantize": True, "q_group_size": 48}, "unsupported quantization group size 48"),
    "mode bits": (lambda f: None, {"quantize": True, "q_mode": "mxfp4", "q_bits": 8}, "bits 8 for mode mxfp4: use 4"),
    "mode": (lambda f: None, {"quantize": True, "q_mode": "int4"}, "unsupported quantization mode 'int4'"),
    "int tensor": (
        _edit_weights(lambda w: w.update({"model.final_norm.weight": w["model.final_norm.weight"].astype(mx.int32)})),
        {},
        "tensor model.final_norm.weight has dtype int32: expected one of float32, bfloat16, float16",
    ),
    "upload repo": (lambda f: None, {"upload_repo": "not a repo"}, "not a valid hub repo id"),
    "offline upload": (lambda f: None, {"upload_repo": "me/griffin"}, "HF_HUB_OFFLINE"),
    "override": (lambda f: None, {"overrides": {"windw": 3}}, "unknown config override windw"),
}


@pytest.mark.parametrize("case", list(BAD_HF))
def test_bad_hf_input(case, deepmind, tmp_path):
    edit, kwargs, message = BAD_HF[case]
    src = _edit_hf(deepmind["root"] / "hf", tmp_path / "src", edit)
    with pytest.raises(RGError, match=message) as e:
        convert(src, tmp_path / "out", **kwargs)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_bad_deepmind_input(deepmind, tmp_path):
    import torch

    state = torch.load(deepmind["root"] / "pt" / "griffin.pt", weights_only=True)
    cases = {
        "missing": ({k: v for k, v in state.items() if k != "blocks.2.attention_block.proj_final.bias"},
                    "missing model.layers.2.temporal_block.o_proj.bias"),
        "unknown": ({**state, "blocks.0.extra": torch.zeros(2)}, "unknown blocks.0.extra"),
        "no embedding": ({k: v for k, v in state.items() if not k.startswith("embedder")},
                         "missing tensor embedder.input_embedding"),
        "int tensor": ({**state, "final_norm.scale": state["final_norm.scale"].int()}, "dtype torch.int32"),
    }
    for name, (sd, message) in cases.items():
        folder = tmp_path / name
        folder.mkdir()
        torch.save(sd, folder / "griffin.pt")
        shutil.copy(deepmind["root"] / "pt" / "tokenizer.model", folder)
        with pytest.raises(RGError, match=message):
            convert(folder, tmp_path / f"{name}_out")  # a folder holding one .pt
        assert not (tmp_path / f"{name}_out").exists()
    (tmp_path / "garbage.pt").write_bytes(b"\x00garbage")
    with pytest.raises(RGError, match="cannot read the PyTorch checkpoint"):
        convert(tmp_path / "garbage.pt", tmp_path / "out")
    orbax = tmp_path / "orbax"
    orbax.mkdir()
    (orbax / "_METADATA").write_text("{}")
    with pytest.raises(RGError, match="Flax/Orbax .* PyTorch"):
        convert(orbax, tmp_path / "out")
    with pytest.raises(RGError, match="no such file or folder"):
        convert(tmp_path / "nowhere", tmp_path / "out")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_existing_output_needs_force(deepmind, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(RGError, match="already exists: pass --force"):
        convert(deepmind["root"] / "hf", out)
    assert (out / "keep.txt").read_text() == "mine"
    convert(deepmind["root"] / "hf", out, force=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    with pytest.raises(RGError, match="must not be or contain SOURCE"):
        convert(out, tmp_path, force=True)
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("error", [RuntimeError("disk on fire"), KeyboardInterrupt()])
def test_crash_midway_leaves_no_output(error, deepmind, tmp_path, monkeypatch):
    real_write = WeightsWriter.write
    written = []

    def write(self, name, array):
        if written:
            raise error
        written.append(name)
        real_write(self, name, array)

    monkeypatch.setattr(WeightsWriter, "write", write)
    with pytest.raises(type(error)):
        convert(deepmind["root"] / "hf", tmp_path / "out", max_shard_bytes=10_000)
    assert written and not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_cli_reports_errors_in_one_line(deepmind, tmp_path, capsys):
    assert cli_main(["convert", str(deepmind["root"] / "hf"), str(tmp_path / "out"), "--dtype", "float64"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("rg-mlx convert: error: unsupported dtype 'float64'") and err.count("\n") == 1
    assert not (tmp_path / "out").exists()
    argv = ["convert", str(deepmind["root"] / "pt"), str(tmp_path / "out"), "--window", str(WINDOW)]
    argv += ["--dtype", "bfloat16"]
    assert cli_main(argv) == 0
    assert "dtype        bfloat16" in capsys.readouterr().out
    assert mx.load(str(tmp_path / "out" / "model.safetensors"))["model.embed_tokens.weight"].dtype == mx.bfloat16


def test_help_lists_the_quantization_the_converter_accepts(capsys):
    """`convert --help` names, per mode, exactly the bits and group sizes the converter accepts."""
    with pytest.raises(SystemExit):
        cli_main(["convert", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    for flag, index in (("--q-bits", 0), ("--q-group-size", 1)):
        listed = re.search(re.escape(flag) + r" Q_\w+ .*?by mode: (.*?) \(default", help_text).group(1)
        per_mode = dict(part.split(" ") for part in listed.split("; "))
        assert set(per_mode) == set(MODES)
        for mode, values in per_mode.items():
            accepted = []
            for n in range(1, 257):
                bits, group_size = (n, DEFAULTS[mode][1]) if index == 0 else (DEFAULTS[mode][0], n)
                try:
                    QuantSpec(mode, bits, group_size)
                    accepted.append(n)
                except RGError:
                    pass
            assert [int(v) for v in values.split("|")] == accepted, (flag, mode)


def test_cli_rejects_bad_quantization_flags_before_reading(tmp_path, capsys):
    cases = [
        (["-q", "--q-bits", "7"], "unsupported quantization bits 7 for mode affine: use 1, 2, 3, 4, 5, 6, 8"),
        (["-q", "--q-mode", "nvfp4", "--q-group-size", "32"],
         "unsupported quantization group size 32 for mode nvfp4: use 16"),
        (["--q-bits", "8"], "--q-bits needs -q/--quantize"),
    ]
    for flags, message in cases:  # SOURCE does not exist: reading it would be another error
        assert cli_main(["convert", str(tmp_path / "nowhere"), str(tmp_path / "out"), *flags]) == 2
        err = capsys.readouterr().err
        assert err == f"rg-mlx convert: error: {message}\n"
    assert not (tmp_path / "out").exists()
