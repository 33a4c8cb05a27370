"""Griffin (RecurrentGemma), following DeepMind's reference implementation.

Parameter names are Hugging Face's, so HF checkpoints and mlx-lm conversions load
as they are. Every block takes `positions` `[B, T]`: the position of each token
within its document (negative for left padding). A document starts where the
position is 0: the RG-LRU restarts from zero there, and neither the conv nor the
attention looks across the start.

The state kept per sequence is fixed in size: per attention layer a ring buffer
of the last `window` keys and values, per recurrent layer the last 3 conv inputs
and the float32 RG-LRU state `h`. It lives in mlx-lm `ArraysCache` objects, so
mlx-lm's generation and prompt-cache files work on this model unchanged.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import mlx.core as mx
import mlx.nn as nn

from .config import ModelArgs
from .fast_math import gelu_mul, soft_cap
from .kernels import rg_lru
from .parallel import Linear, attention, elementwise, linear

if TYPE_CHECKING:
    from mlx_lm.models.cache import ArraysCache

# Position of an empty ring-buffer slot: outside every query's window.
_EMPTY = -(2**30)
# Queries per block in a long attention pass, so memory stays linear in T.
_ATTN_BLOCK = 1024


def embedding_scale(width: int) -> float:
    """sqrt(width) rounded to bfloat16, as the checkpoints were trained."""
    return mx.array(math.sqrt(width), dtype=mx.bfloat16).item()


class RMSNorm(nn.Module):
    def __init__(self, dims: int, eps: float = 1e-6):
        super().__init__()
        self.weight = mx.zeros((dims,))
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        return mx.fast.rms_norm(x, 1.0 + self.weight, self.eps)


class MLPBlock(nn.Module):
    """Gated MLP: down(gelu_tanh(gate(x)) * up(x))."""

    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.gate_proj = Linear(width, hidden)
        self.up_proj = Linear(width, hidden)
        self.down_proj = Linear(hidden, width)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(elementwise(gelu_mul, self.gate_proj(x), self.up_proj(x)))


class Conv1D(nn.Module):
    """Causal depthwise temporal conv: out[t] = b + sum_s x[t-s] * w[K-1-s], never across a document start.

    The weight is stored `[L, K, 1]` (mlx-lm's layout); state is the last K-1 inputs.
    """

    def __init__(self, width: int, temporal_width: int = 4):
        super().__init__()
        self.weight = mx.zeros((width, temporal_width, 1))
        self.bias = mx.zeros((width,))

    def __call__(self, x: mx.array, positions: mx.array, state: mx.array | None) -> tuple[mx.array, mx.array]:
        B, T, L = x.shape
        K = self.weight.shape[1]
        if state is None:
            state = mx.zeros((B, K - 1, L), x.dtype)
        xp = mx.concatenate([state.astype(x.dtype), x], axis=1)
        w = self.weight[:, :, 0].astype(x.dtype)
        out = xp[:, K - 1 :] * w[:, K - 1]
        for s in range(1, K):
            tap = xp[:, K - 1 - s : K - 1 - s + T] * w[:, K - 1 - s]
            out = out + mx.where((positions >= s)[..., None], tap, 0)
        return out + self.bias.astype(x.dtype), xp[:, -(K - 1) :]


class RGLRU(nn.Module):
    """Real-Gated Linear Recurrent Unit: h_t = a_t h_{t-1} + sqrt(1 - a_t^2) (i_t * x_t)."""

    def __init__(self, width: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        bw = width // num_heads
        self.recurrent_param = mx.zeros((width,))
        self.input_gate_weight = mx.zeros((num_heads, bw, bw))
        self.input_gate_bias = mx.zeros((num_heads, bw))
        self.recurrent_gate_weight = mx.zeros((num_heads, bw, bw))
        self.recurrent_gate_bias = mx.zeros((num_heads, bw))

    def _block_diagonal(self, x: mx.array, w: mx.array, b: mx.array) -> mx.array:
        B, T, L = x.shape
        xh = x.reshape(B * T, self.num_heads, -1).swapaxes(0, 1)  # [H, B*T, bw]
        y = (xh @ w).swapaxes(0, 1) + b  # weight layout [H, in, out]
        return y.reshape(B, T, L)

    def __call__(self, x: mx.array, positions: mx.array, h: mx.array | None) -> tuple[mx.array, mx.array]:
        gate_x = self._block_diagonal(x, self.input_gate_weight, self.input_gate_bias)
        gate_a = self._block_diagonal(x, self.recurrent_gate_weight, self.recurrent_gate_bias)
        return rg_lru(x, gate_x, gate_a, self.recurrent_param, reset=positions == 0, h0=h)


class RecurrentBlock(nn.Module):
    """Temporal block of the recurrent layers: linear_out(rg_lru(conv(linear_x(x))) * gelu(linear_y(x)))."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        W, L = args.hidden_size, args.lru_width
        self.linear_y = Linear(W, L)
        self.linear_x = Linear(W, L)
        self.linear_out = Linear(L, W)
        self.conv_1d = Conv1D(L, args.conv1d_width)
        self.rg_lru = RGLRU(L, args.num_attention_heads)

    def __call__(self, x: mx.array, positions: mx.array, cache: ArraysCache | None) -> mx.array:
        conv_state, h = (cache[0], cache[1]) if cache is not None else (None, None)
        y = self.linear_y(x)
        x = self.linear_x(x)
        x, conv_state = self.conv_1d(x, positions, conv_state)
        x, h = self.rg_lru(x, positions, h)
        if cache is not None:
            cache[0], cache[1] = conv_state, h
        return self.linear_out(elementwise(gelu_mul, y, x))


def apply_rope(x: mx.array, positions: mx.array, dims: int, base: float) -> mx.array:
    """Rotary embedding (rotate-half layout) on the first `dims` features of each head; sin/cos in float32."""
    half = dims // 2
    inv_freq = 1.0 / (base ** (mx.arange(half, dtype=mx.float32) * 2 / dims))
    angles = positions[:, None, :, None].astype(mx.float32) * inv_freq  # [B, 1, T, half]
    sin, cos = mx.sin(angles).astype(x.dtype), mx.cos(angles).astype(x.dtype)
    x1, x2, rest = x[..., :half], x[..., half:dims], x[..., dims:]
    return mx.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], axis=-1)


def window_mask(q_pos: mx.array, k_pos: mx.array, window: int) -> mx.array:
    """`[B, 1, Tq, Tk]`: a query sees itself and the previous `window` tokens of its document.

    Left-padding queries (negative positions) see only padding, so no row is empty.
    """
    q, k = q_pos[:, None, :, None], k_pos[:, None, None, :]
    return (k <= q) & (q - k <= window) & ((k >= 0) | (q < 0))


class LocalAttentionBlock(nn.Module):
    """Local multi-query attention with RoPE on half of each head's dims."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        W, H, D = args.hidden_size, args.num_attention_heads, args.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = H, args.num_key_value_heads, D
        self.window = args.attention_window_size
        self.rope_dims = int(D * args.partial_rotary_factor)
        self.rope_base = args.rope_theta
        self.scale = D**-0.5
        self.q_proj = Linear(W, H * D, bias=False)
        self.k_proj = Linear(W, self.num_kv_heads * D, bias=False)
        self.v_proj = Linear(W, self.num_kv_heads * D, bias=False)
        self.o_proj = Linear(H * D, W, bias=True)

    def __call__(self, x: mx.array, positions: mx.array, cache: ArraysCache | None) -> mx.array:
        B, T, _ = x.shape
        q = self.q_proj(x).reshape(B, T, self.num_heads, -1).transpose(0, 2, 1, 3)
        k = self.k_proj(x).reshape(B, T, self.num_kv_heads, -1).transpose(0, 2, 1, 3)
        v = self.v_proj(x).reshape(B, T, self.num_kv_heads, -1).transpose(0, 2, 1, 3)
        q = apply_rope(q, positions, self.rope_dims, self.rope_base)
        k = apply_rope(k, positions, self.rope_dims, self.rope_base)

        past = self._past(cache, positions) if cache is not None and cache[0] is not None else None
        out = self._attend(q, k, v, positions, past)
        if cache is not None:
            self._update_ring(cache, k, v, positions)
        out = out.transpose(0, 2, 1, 3).reshape(B, T, -1)
        return self.o_proj(out)

    def _past(self, cache: ArraysCache, positions: mx.array) -> tuple[mx.array, mx.array, mx.array]:
        """The ring's keys, values and key positions; while it is still filling, only its filled slots.

        Position p >= 0 sits in slot p % window, so until a row's next position reaches `window`,
        the slots from the largest next position on hold only left padding or nothing, which no
        query of a document sees. Reading that bound is a sync, so a decode step on a GPU (queued
        ahead of the previous one) skips it.
        """
        keys, values, k_pos = cache[0], cache[1], cache[2]
        if positions.shape[1] > 1 or mx.default_device().type == mx.DeviceType.cpu:
            filled = max(0, positions[:, 0].max().item())
            if filled < self.window:
                return keys[:, :, :filled], values[:, :, :filled], k_pos[:, :filled]
        return keys, values, k_pos

    def _attend(self, q, k, v, positions, past) -> mx.array:
        T = q.shape[2]
        outs = []
        for s in range(0, T, _ATTN_BLOCK):
            e = min(T, s + _ATTN_BLOCK)
            lo = max(0, s - self.window)
            keys, values, k_pos = k[:, :, lo:e], v[:, :, lo:e], positions[:, lo:e]
            if past is not None and s < self.window:
                keys = mx.concatenate([past[0], keys], axis=2)
                values = mx.concatenate([past[1], values], axis=2)
                k_pos = mx.concatenate([past[2], k_pos], axis=1)
            mask = window_mask(positions[:, s:e], k_pos, self.window)
            outs.append(attention(q[:, :, s:e], keys, values, self.scale, mask))
        return outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=2)

    def _update_ring(self, cache: ArraysCache, k, v, positions) -> None:
        """Write the last min(T, window) keys/values into slots `position % window`."""
        B, n_kv, T, D = k.shape
        W = self.window
        if cache[0] is None:
            keys = mx.zeros((B, n_kv, W, D), k.dtype)
            values = mx.zeros((B, n_kv, W, D), v.dtype)
            k_pos = mx.full((B, W), _EMPTY, mx.int32)
        else:
            keys, values, k_pos = cache[0], cache[1], cache[2]
        n = min(T, W)
        pos = positions[:, T - n :]
        slots = mx.remainder(pos, W)  # [B, n], distinct within a row
        idx = slots[:, None, :, None]
        cache[0] = mx.put_along_axis(keys, idx, k[:, :, T - n :], axis=2)
        cache[1] = mx.put_along_axis(values, idx, v[:, :, T - n :], axis=2)
        cache[2] = mx.put_along_axis(k_pos, slots, pos.astype(mx.int32), axis=1)


class ResidualBlock(nn.Module):
    """r = x + temporal(norm(x)); out = r + mlp(norm(r))."""

    def __init__(self, args: ModelArgs, block_type: str):
        super().__init__()
        self.temporal_block_type = block_type
        self.temporal_pre_norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        if block_type == "recurrent":
            self.temporal_block = RecurrentBlock(args)
        else:
            self.temporal_block = LocalAttentionBlock(args)
        self.channel_pre_norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.mlp_block = MLPBlock(args.hidden_size, args.mlp_width)

    def __call__(self, x: mx.array, positions: mx.array, cache: ArraysCache | None) -> mx.array:
        r = x + self.temporal_block(self.temporal_pre_norm(x), positions, cache)
        return r + self.mlp_block(self.channel_pre_norm(r))


class Griffin(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [ResidualBlock(args, t) for t in args.layer_types]
        self.final_norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.scale = embedding_scale(args.hidden_size) if args.embeddings_scale_by_sqrt_dim else None

    def __call__(self, tokens: mx.array, cache: list[ArraysCache] | None = None) -> mx.array:
        B, T = tokens.shape
        x = self.embed_tokens(tokens)
        if self.scale is not None:
            x = x * mx.array(self.scale, x.dtype)
        start = _next_position(cache, B)
        positions = start[:, None] + mx.arange(T, dtype=mx.int32)
        for i, layer in enumerate(self.layers):
            c = cache[i] if cache is not None else None
            x = layer(x, positions, c)
            if c is not None:
                c[-1] = start + T
        return self.final_norm(x)


def _next_position(cache: list[ArraysCache] | None, batch: int) -> mx.array:
    if cache is None or cache[0][-1] is None:
        return mx.zeros((batch,), mx.int32)
    pos = cache[0][-1]
    return pos if pos.shape[0] == batch else mx.broadcast_to(pos, (batch,))


class Model(nn.Module):
    """RecurrentGemma with mlx-lm's model protocol: `model(tokens[B, T], cache) -> logits[B, T, V]`."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.model = Griffin(args)

    def __call__(self, tokens: mx.array, cache: list[ArraysCache] | None = None) -> mx.array:
        return self.logits(self.model(tokens, cache))

    def logits(self, hidden: mx.array) -> mx.array:
        """Tied output layer and soft cap: `tanh(h E^T / cap) * cap`."""
        embed = self.model.embed_tokens
        logits = linear(hidden, embed.weight) if isinstance(embed, nn.Embedding) else embed.as_linear(hidden)
        cap = self.args.logits_soft_cap
        return soft_cap(logits, cap) if cap else logits

    @property
    def layers(self) -> list[ResidualBlock]:
        return self.model.layers

    def make_cache(self, left_padding: list[int] | None = None) -> list[ArraysCache]:
        """A fresh fixed-size state: one `ArraysCache` per layer, filled on the first call.

        Recurrent layers hold `[conv_state, h, next_position]`, attention layers
        `[keys, values, key_positions, next_position]`. With `left_padding`, row i
        starts its document after `left_padding[i]` padding tokens.
        """
        from mlx_lm.models.cache import ArraysCache

        caches = []
        for layer in self.layers:
            c = ArraysCache(3 if layer.temporal_block_type == "recurrent" else 4)
            if left_padding is not None:
                c[-1] = -mx.array(left_padding, dtype=mx.int32)
            caches.append(c)
        return caches

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Map checkpoint layouts onto ours: drop the tied `lm_head`, conv weight `[L,1,K]` -> `[L,K,1]`."""
        weights = {k: v for k, v in weights.items() if not k.startswith("lm_head.")}
        for k, v in weights.items():
            if k.endswith("conv_1d.weight") and v.ndim == 3 and v.shape[1] == 1 and v.shape[2] != 1:
                weights[k] = v.swapaxes(1, 2)
        return weights


def initial_weight(name: str, shape: tuple[int, ...], num_layers: int) -> mx.array:
    """DeepMind's initialisation of the parameter `name` (float32): variance-scaled normals, output
    projections scaled by 2 / layers, zero biases and norms, RG-LRU decays a in [0.9, 0.999]."""
    leaf = name.rsplit(".", 1)[-1]
    if "embed_tokens" in name:
        return mx.random.normal(shape) * math.sqrt(1.0 / shape[-1])
    if leaf == "recurrent_param":
        radius_sq = mx.random.uniform(0.9**2, 0.999**2, shape)
        return mx.log(mx.expm1(-0.5 * mx.log(radius_sq)))  # softplus^-1(-log radius)
    if "conv_1d" in name and leaf == "weight":  # [L, K, 1] here, [L, 1, K] in checkpoints
        return mx.random.normal(shape) * math.sqrt(0.01 / math.prod(shape[1:]))
    if leaf.endswith("weight") and len(shape) >= 2:  # Linear [out, in]; block-diagonal gates [H, in, out]
        output = any(f".{o}." in f".{name}" for o in ("o_proj", "linear_out", "down_proj"))
        return mx.random.normal(shape) * math.sqrt((2.0 / num_layers if output else 1.0) / shape[1])
    return mx.zeros(shape)  # biases and norm scales (RMSNorm multiplies by 1 + scale)
