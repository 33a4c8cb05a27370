"""Griffin (RecurrentGemma), as in the paper (arXiv 2402.19427) and DeepMind's reference code.

Plain MLX layers and ops, one small class per block. Parameter names are Hugging Face's, so
Hugging Face checkpoints and mlx-lm conversions load as they are. Every block takes
`positions` `[B, T]`: the position of each token within its document, negative on padding (left
or right, see `rg_mlx.state`). A document starts where the position is 0: the RG-LRU restarts from
zero there, and neither the conv nor the attention looks across the start. A padding token changes
no state.

The state kept per sequence is fixed in size (see `rg_mlx.state`): per attention layer a ring
of the last `window` keys and values, per recurrent layer the last conv inputs and the float32
RG-LRU state. It lives in mlx-lm `ArraysCache` objects, so mlx-lm's generation and prompt-cache
files work on this model unchanged.

Platforms change the built model, never this file: layers are swapped (as `nn.quantize` does)
and the few operations inside the blocks that have faster equivalents are entries of the
model's `Ops` table (`rg_mlx.cpu.accelerate` does both on the CPU). `Model.shard` swaps layers
the same way to split the model over the processes of an `mx.distributed` group.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import mlx.core as mx
import mlx.nn as nn
from mlx.nn.layers.distributed import shard_inplace, shard_linear

from .config import ModelArgs
from .kernels import rg_lru
from .state import AttentionState, Caches, RecurrentState, advance, make_cache, next_position, token_positions

if TYPE_CHECKING:
    from mlx_lm.models.cache import ArraysCache

# Queries per block in a long attention pass, so that its memory stays linear in T.
ATTENTION_BLOCK = 1024


# -- The replaceable operations ---------------------------------------------------------------


def gelu_gate(y: mx.array, x: mx.array) -> mx.array:
    """`gelu(y) * x`, GELU in its tanh form (as the checkpoints were trained)."""
    return nn.gelu_approx(y) * x


def soft_cap(logits: mx.array, cap: float) -> mx.array:
    """`tanh(logits / cap) * cap`."""
    return mx.tanh(logits / cap) * cap


def attention(q: mx.array, k: mx.array, v: mx.array, scale: float, mask: mx.array) -> mx.array:
    """Softmax attention of `q` `[B, H, T, D]` over `k`, `v` `[B, H_kv, S, D]` where `mask` `[B, 1, T, S]`."""
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)


def ring(state: AttentionState, positions: mx.array, window: int) -> tuple[mx.array, mx.array, mx.array]:
    """What an attention layer reads of its ring before the new keys: keys, values, key positions."""
    return state.keys, state.values, state.key_positions


@dataclass
class Ops:
    """The operations inside the blocks that a platform may replace after the model is built.

    The defaults are the paper's formulas in plain MLX; a replacement computes the same function
    (the tests hold both to DeepMind's reference). One instance is shared by all blocks of a model.
    """

    gelu_gate: Callable[[mx.array, mx.array], mx.array] = gelu_gate
    soft_cap: Callable[[mx.array, float], mx.array] = soft_cap
    attention: Callable[..., mx.array] = attention
    rg_lru: Callable[..., tuple[mx.array, mx.array]] = rg_lru
    ring: Callable[[AttentionState, mx.array, int], tuple[mx.array, mx.array, mx.array]] = ring


# -- The blocks ---------------------------------------------------------------------------------


def embedding_scale(width: int) -> float:
    """sqrt(width) rounded to bfloat16, as the checkpoints were trained."""
    return mx.array(math.sqrt(width), dtype=mx.bfloat16).item()


class RMSNorm(nn.Module):
    """`x * rsqrt(mean(x^2) + eps) * (1 + scale)`."""

    def __init__(self, dims: int, eps: float = 1e-6):
        super().__init__()
        self.weight = mx.zeros((dims,))
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        return mx.fast.rms_norm(x, 1.0 + self.weight, self.eps)


class MLPBlock(nn.Module):
    """Gated MLP: `down(gelu(gate(x)) * up(x))`."""

    def __init__(self, width: int, hidden: int, ops: Ops):
        super().__init__()
        self.gate_proj = nn.Linear(width, hidden)
        self.up_proj = nn.Linear(width, hidden)
        self.down_proj = nn.Linear(hidden, width)
        self.ops = ops

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(self.ops.gelu_gate(self.gate_proj(x), self.up_proj(x)))


class Conv1D(nn.Module):
    """Causal depthwise temporal conv: `out[t] = b + sum_s x[t-s] w[K-1-s]`, never across a document start.

    The weight is stored `[L, K, 1]` (mlx-lm's layout). Returns the output and the inputs it read
    (`[B, K-1+T, L]`: the state, the last K-1 inputs before this call, then this call's).
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
        xp = mx.concatenate([state.astype(x.dtype), x], axis=1)  # [B, K-1+T, L]
        w = self.weight[:, :, 0].astype(x.dtype)  # [L, K]
        out = xp[:, K - 1 :] * w[:, K - 1]
        for s in range(1, K):
            tap = xp[:, K - 1 - s : K - 1 - s + T] * w[:, K - 1 - s]
            out = out + mx.where((positions >= s)[..., None], tap, 0)
        return out + self.bias.astype(x.dtype), xp


class RGLRU(nn.Module):
    """Real-Gated Linear Recurrent Unit (paper eq. 1-4), c = 8:

    `r_t = sigmoid(W_a x_t + b_a)`, `i_t = sigmoid(W_x x_t + b_x)`, `a_t = a^(c r_t)` with
    `log a = -softplus(recurrent_param)`, `h_t = a_t h_{t-1} + sqrt(1 - a_t^2) (i_t x_t)`; the gates are
    block-diagonal, one block per head. The recurrence runs in float32 (`rg_mlx.kernels.rg_lru`).
    A `padding` step leaves `h` exactly as it is: `r = sigmoid(-inf) = 0` makes `a = 1` and `x = 0` adds nothing.
    """

    def __init__(self, width: int, num_heads: int, ops: Ops):
        super().__init__()
        self.num_heads = num_heads
        bw = width // num_heads
        self.recurrent_param = mx.zeros((width,))
        self.input_gate_weight = mx.zeros((num_heads, bw, bw))
        self.input_gate_bias = mx.zeros((num_heads, bw))
        self.recurrent_gate_weight = mx.zeros((num_heads, bw, bw))
        self.recurrent_gate_bias = mx.zeros((num_heads, bw))
        self.ops = ops

    def _block_diagonal(self, x: mx.array, w: mx.array, b: mx.array) -> mx.array:
        B, T, L = x.shape
        xh = x.reshape(B * T, self.num_heads, -1).swapaxes(0, 1)  # [H, B*T, bw]
        y = (xh @ w).swapaxes(0, 1) + b  # weight layout [H, in, out]
        return y.reshape(B, T, L)

    def __call__(
        self, x: mx.array, positions: mx.array, h: mx.array | None, padding: mx.array | None = None
    ) -> tuple[mx.array, mx.array]:
        gate_x = self._block_diagonal(x, self.input_gate_weight, self.input_gate_bias)
        gate_a = self._block_diagonal(x, self.recurrent_gate_weight, self.recurrent_gate_bias)
        if padding is not None:
            pad = padding[..., None]
            x, gate_a = mx.where(pad, 0, x), mx.where(pad, -mx.inf, gate_a)
        return self.ops.rg_lru(x, gate_x, gate_a, self.recurrent_param, reset=positions == 0, h0=h)


class RecurrentBlock(nn.Module):
    """The temporal block of the recurrent layers: `linear_out(rg_lru(conv(linear_x(x))) * gelu(linear_y(x)))`."""

    def __init__(self, args: ModelArgs, ops: Ops):
        super().__init__()
        W, L = args.hidden_size, args.lru_width
        self.linear_y = nn.Linear(W, L)
        self.linear_x = nn.Linear(W, L)
        self.linear_out = nn.Linear(L, W)
        self.conv_1d = Conv1D(L, args.conv1d_width)
        self.rg_lru = RGLRU(L, args.num_attention_heads, ops)
        self.ops = ops

    def __call__(self, x: mx.array, positions: mx.array, cache: ArraysCache | None) -> mx.array:
        state = RecurrentState(cache) if cache is not None else None
        y = self.linear_y(x)
        x = self.linear_x(x)
        x, conv_inputs = self.conv_1d(x, positions, state.conv if state else None)
        x, h = self.rg_lru(x, positions, state.h if state else None, state.padding(positions) if state else None)
        if state:
            state.write(conv_inputs, h, positions)
        return self.linear_out(self.ops.gelu_gate(y, x))


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
    """Local multi-query attention with RoPE on the first half of each head's dims."""

    def __init__(self, args: ModelArgs, ops: Ops):
        super().__init__()
        W, H, D = args.hidden_size, args.num_attention_heads, args.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = H, args.num_key_value_heads, D
        self.window = args.attention_window_size
        self.rope_dims = int(D * args.partial_rotary_factor)
        self.rope_base = args.rope_theta
        self.scale = D**-0.5
        self.q_proj = nn.Linear(W, H * D, bias=False)
        self.k_proj = nn.Linear(W, self.num_kv_heads * D, bias=False)
        self.v_proj = nn.Linear(W, self.num_kv_heads * D, bias=False)
        self.o_proj = nn.Linear(H * D, W, bias=True)
        self.ops = ops

    def __call__(self, x: mx.array, positions: mx.array, cache: ArraysCache | None) -> mx.array:
        B, T, _ = x.shape
        q = self.q_proj(x).reshape(B, T, self.num_heads, -1).transpose(0, 2, 1, 3)  # [B, H, T, D]
        k = self.k_proj(x).reshape(B, T, self.num_kv_heads, -1).transpose(0, 2, 1, 3)  # [B, kv, T, D]
        v = self.v_proj(x).reshape(B, T, self.num_kv_heads, -1).transpose(0, 2, 1, 3)
        q = apply_rope(q, positions, self.rope_dims, self.rope_base)
        k = apply_rope(k, positions, self.rope_dims, self.rope_base)

        state = AttentionState(cache) if cache is not None else None
        past = self.ops.ring(state, positions, self.window) if state and state.keys is not None else None
        out = self._attend(q, k, v, positions, past)
        if state:
            state.write(k, v, positions, self.window)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, T, -1))

    def _attend(self, q, k, v, positions, past) -> mx.array:
        """Attention over the ring's keys (`past`) and this call's, in blocks of queries."""
        T = q.shape[2]
        outs = []
        for s in range(0, T, ATTENTION_BLOCK):
            e = min(T, s + ATTENTION_BLOCK)
            lo = max(0, s - self.window)
            keys, values, k_pos = k[:, :, lo:e], v[:, :, lo:e], positions[:, lo:e]
            if past is not None and s < self.window:
                keys = mx.concatenate([past[0], keys], axis=2)
                values = mx.concatenate([past[1], values], axis=2)
                k_pos = mx.concatenate([past[2], k_pos], axis=1)
            mask = window_mask(positions[:, s:e], k_pos, self.window)
            outs.append(self.ops.attention(q[:, :, s:e], keys, values, self.scale, mask))
        return outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=2)


class ResidualBlock(nn.Module):
    """`r = x + temporal(norm(x)); out = r + mlp(norm(r))`."""

    def __init__(self, args: ModelArgs, block_type: str, ops: Ops):
        super().__init__()
        self.temporal_block_type = block_type
        self.temporal_pre_norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        if block_type == "recurrent":
            self.temporal_block = RecurrentBlock(args, ops)
        else:
            self.temporal_block = LocalAttentionBlock(args, ops)
        self.channel_pre_norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.mlp_block = MLPBlock(args.hidden_size, args.mlp_width, ops)

    def __call__(self, x: mx.array, positions: mx.array, cache: ArraysCache | None) -> mx.array:
        r = x + self.temporal_block(self.temporal_pre_norm(x), positions, cache)
        return r + self.mlp_block(self.channel_pre_norm(r))


class Griffin(nn.Module):
    """Embedding (scaled by sqrt(width) in bfloat16), the residual blocks, the final norm."""

    def __init__(self, args: ModelArgs, ops: Ops):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [ResidualBlock(args, t, ops) for t in args.layer_types]
        self.final_norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.scale = embedding_scale(args.hidden_size) if args.embeddings_scale_by_sqrt_dim else None

    def __call__(self, tokens: mx.array, cache: Caches | None = None) -> mx.array:
        B, T = tokens.shape
        x = self.embed_tokens(tokens)  # [B, T, W]
        if self.scale is not None:
            x = x * mx.array(self.scale, x.dtype)
        start = next_position(cache, B)
        positions = token_positions(cache, start, T)  # [B, T]
        for i, layer in enumerate(self.layers):
            x = layer(x, positions, cache[i] if cache is not None else None)
        if cache is not None:
            advance(cache, start, T)
        return self.final_norm(x)


class ShardedEmbedding(nn.Module):
    """The tied embedding split by vocabulary over the ranks of `group` (built by `Model.shard`).

    Each rank holds `ceil(V / ranks)` consecutive rows of the embedding (`embedding`: an
    `nn.Embedding` or `nn.QuantizedEmbedding`; the last rank's tail is zero rows). A lookup takes
    the rows this rank holds and sums over the ranks (`width` values a token); the output layer
    computes this rank's logits and gathers everyone's (`V` values a token).
    """

    def __init__(self, embedding: nn.Module, vocab_size: int, group: mx.distributed.Group):
        super().__init__()
        self.group = group
        self.vocab_size = vocab_size
        self.rows = -(-vocab_size // group.size())
        self.offset = group.rank() * self.rows

        def own_rows(p: mx.array) -> mx.array:  # weight, scales, biases: one row per token
            part = p[self.offset : self.offset + self.rows]
            missing = self.rows - part.shape[0]
            if missing:
                part = mx.concatenate([part, mx.zeros((missing, *p.shape[1:]), p.dtype)])
            return mx.contiguous(part)

        embedding.update({name: own_rows(p) for name, p in embedding.parameters().items()})
        self.embedding = embedding

    def __call__(self, tokens: mx.array) -> mx.array:
        local = tokens - self.offset
        held = (local >= 0) & (local < self.rows)
        x = self.embedding(mx.where(held, local, 0))  # [B, T, W]
        return mx.distributed.all_sum(mx.where(held[..., None], x, 0), group=self.group)

    def as_linear(self, x: mx.array) -> mx.array:
        logits = self.embedding.as_linear(x)  # [..., rows]: this rank's part of the vocabulary
        *lead, rows = logits.shape
        parts = mx.distributed.all_gather(logits.reshape(1, -1, rows), group=self.group)  # [ranks, N, rows]
        return parts.swapaxes(0, 1).reshape(*lead, -1)[..., : self.vocab_size]


class Model(nn.Module):
    """RecurrentGemma with mlx-lm's model protocol: `model(tokens[B, T], cache) -> logits[B, T, V]`."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.ops = Ops()
        self.model = Griffin(args, self.ops)

    def __call__(self, tokens: mx.array, cache: Caches | None = None) -> mx.array:
        return self.logits(self.model(tokens, cache))

    def logits(self, hidden: mx.array) -> mx.array:
        """The tied output layer and soft cap: `tanh(h E^T / cap) * cap`."""
        logits = self.model.embed_tokens.as_linear(hidden)
        cap = self.args.logits_soft_cap
        return self.ops.soft_cap(logits, cap) if cap else logits

    @property
    def layers(self) -> list[ResidualBlock]:
        return self.model.layers

    def shard(self, group: mx.distributed.Group | None = None) -> None:
        """Split the model over the ranks of `group` (tensor parallelism, mlx-lm's convention), in place.

        Every block computes a part of its output on each rank and one all-reduce sums the parts:
        the MLP by hidden units (gate and up split by output, down by input); the recurrent block
        by RG-LRU heads (linear_x, linear_y by output channel, the conv and the RG-LRU's per-head
        gates and decay by channel, linear_out by input), so each rank's recurrent state is its
        channels; local attention by query heads (o_proj by input) while the single key/value
        head, and so the attention ring, is whole on every rank. The tied embedding is split by
        vocabulary (`ShardedEmbedding`). The shares are evaluated here, one layer at a time: called
        on a lazily loaded model (as `rg_mlx.load(..., group=...)` and mlx-lm's `sharded_load` do),
        a rank holds each whole tensor only while its share is cut out of it.
        """
        group = group or mx.distributed.init()
        n = group.size()
        if n == 1:
            return
        self.args.check_split(n)

        def by_channel(path: str, weight: mx.array) -> int:
            return 0  # [H, bw, bw] gates, [H, bw] biases, [L] decay, [L, K, 1] conv: axis 0 is the head or channel

        for layer in self.layers:
            block, mlp = layer.temporal_block, layer.mlp_block
            if layer.temporal_block_type == "recurrent":
                block.linear_x = shard_linear(block.linear_x, "all-to-sharded", group=group)
                block.linear_y = shard_linear(block.linear_y, "all-to-sharded", group=group)
                block.linear_out = shard_linear(block.linear_out, "sharded-to-all", group=group)
                shard_inplace(block.conv_1d, by_channel, group=group)
                shard_inplace(block.rg_lru, by_channel, group=group)
                block.rg_lru.num_heads //= n
            else:
                block.q_proj = shard_linear(block.q_proj, "all-to-sharded", group=group)
                if block.num_kv_heads > 1:  # one key/value head is computed whole on every rank
                    block.k_proj = shard_linear(block.k_proj, "all-to-sharded", group=group)
                    block.v_proj = shard_linear(block.v_proj, "all-to-sharded", group=group)
                    block.num_kv_heads //= n
                block.o_proj = shard_linear(block.o_proj, "sharded-to-all", group=group)
                block.num_heads //= n
            mlp.gate_proj = shard_linear(mlp.gate_proj, "all-to-sharded", group=group)
            mlp.up_proj = shard_linear(mlp.up_proj, "all-to-sharded", group=group)
            mlp.down_proj = shard_linear(mlp.down_proj, "sharded-to-all", group=group)
        self.model.embed_tokens = ShardedEmbedding(self.model.embed_tokens, self.args.vocab_size, group)
        for _, module in self.named_modules():
            mx.eval([p for p in module.values() if isinstance(p, mx.array)])

    def make_cache(self, left_padding: list[int] | None = None) -> Caches:
        """A fresh fixed-size state (see `rg_mlx.state`); with `left_padding`, row i starts its
        document after `left_padding[i]` padding tokens."""
        return make_cache(self.args.layer_types, left_padding)

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
