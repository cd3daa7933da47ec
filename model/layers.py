"""Building blocks shared by every model family: dense layers, norms, embeddings, positions, MLP.

Shape legend: B batch, T length, D d_model, N query heads, G kv heads, K head size, F d_ff,
V vocab. Every parameter is created with logical axis names (see configs/base.py: DEFAULT_RULES)
and every large activation is constrained by logical names, so no module names a mesh axis.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

import qwix

from model.config import ModelConfig

Names = tuple[str | None, ...]
QTYPES = {"int8": jnp.int8, "int4": jnp.int4}   # quantized kernels and inputs (model/quant.py)
INPUT_SCALE = "input_scale"   # a calibrated Dense's static input scale (model/quant.py)


def constrain(x: jax.Array, names: Names) -> jax.Array:
    """Sharding constraint by logical names; a no-op outside a mesh/rules context."""
    return nn.with_logical_constraint(x, names)


class Dense(nn.Module):
    """x @ kernel over the trailing `axis` dims of x; the kernel carries logical axis `names`.

    (flax's DenseGeneral initialises a flattened kernel, which breaks logical constraints on
    multi-axis kernels under a mesh; this one creates the kernel in its real shape.)
    """
    features: tuple[int, ...]
    names: Names
    axis: tuple[int, ...]
    std: float
    use_bias: bool
    dtype: Any
    param_dtype: Any
    split: bool = False
    activations: str = ""   # a quantized kernel's input type ('' = float; model/quant.py)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array | tuple[jax.Array, ...]:
        """x @ kernel; with `split`, one output per index of the first output feature axis,
        each from its own kernel slice (slicing one wide output instead makes the backward
        pass pad every slice's gradient back to the full activation)."""
        axis = tuple(a % x.ndim for a in self.axis)
        kernel_shape = tuple(x.shape[a] for a in axis) + self.features
        kernel = self.param("kernel", nn.with_logical_partitioning(
            nn.initializers.normal(self.std), self.names), kernel_shape, self.param_dtype)
        bias = self.param("bias", nn.with_logical_partitioning(
            nn.initializers.zeros, self.names[len(axis):]), self.features,
            self.param_dtype) if self.use_bias else None
        x = x.astype(self.dtype)
        if not self.split:
            return self._apply(x, axis, kernel, bias)
        index = (slice(None),) * len(axis)
        return tuple(self._apply(x, axis, kernel[index + (i,)], None if bias is None else bias[i])
                     for i in range(self.features[0]))

    def _apply(self, x, axis, kernel, bias):
        dims = ((axis, tuple(range(len(axis)))), ((), ()))
        if isinstance(kernel, qwix.QArray):   # post-training quantized (quant.mode=ptq)
            input_scale = (self.get_variable("params", INPUT_SCALE)
                           if self.has_variable("params", INPUT_SCALE) else None)
            y = quantized_matmul(x, kernel, dims, self.activations, self.dtype, input_scale)
        else:
            y = jax.lax.dot_general(x, kernel.astype(self.dtype), dims)
        if bias is not None:
            y = y + bias.astype(self.dtype).reshape((1,) * (y.ndim - bias.ndim) + bias.shape)
        return y


def quantized_matmul(x: jax.Array, kernel: qwix.QArray, dimension_numbers, activations: str,
                     dtype, input_scale: jax.Array | None = None) -> jax.Array:
    """x @ kernel for a quantized kernel, by qwix's dot_general: weights only, the kernel is
    dequantized into the matmul; with `activations` ('int8') the input is quantized too and the
    product is int8 x int8: with the calibrated static `input_scale` if there is one, else per
    token (every axis but the contracted ones keeps its own scale, computed at run time)."""
    if activations and input_scale is not None:
        qmax = float(jnp.iinfo(QTYPES[activations]).max)
        scale = input_scale.astype(jnp.float32)
        q = jnp.clip(jnp.round(x.astype(jnp.float32) / scale), -qmax, qmax)
        x = qwix.QArray(qvalue=q.astype(QTYPES[activations]),
                        scale=jnp.reshape(scale, (1,) * x.ndim).astype(x.dtype),
                        qtype=QTYPES[activations])
    elif activations:
        contracted = set(dimension_numbers[0][0])
        x = qwix.quantize(x, QTYPES[activations],
                          channelwise_axes=[a for a in range(x.ndim) if a not in contracted])
    return qwix.dot_general(x, kernel, dimension_numbers).astype(dtype)


def dense(cfg: ModelConfig, features: int | Sequence[int], names: Names, *, axis=-1,
          std: float | None = None, name: str | None = None, split: bool = False) -> Dense:
    """A Dense layer in the model's dtypes; `names` lists input axes, then output axes."""
    return Dense(features=(features,) if isinstance(features, int) else tuple(features),
                 names=names, axis=(axis,) if isinstance(axis, int) else tuple(axis),
                 std=cfg.init_std if std is None else std, use_bias=cfg.use_bias,
                 dtype=cfg.compute_dtype, param_dtype=cfg.weights_dtype, split=split,
                 activations=cfg.quant_activations, name=name)


def norm(cfg: ModelConfig, name: str | None = None) -> nn.Module:
    """Pre-norm layer chosen by `model.norm`; statistics are computed in float32."""
    scale_init = nn.with_logical_partitioning(nn.initializers.ones, ("norm",))
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(epsilon=cfg.norm_eps, dtype=cfg.compute_dtype,
                          param_dtype=cfg.weights_dtype, scale_init=scale_init, name=name)
    return nn.LayerNorm(epsilon=cfg.norm_eps, dtype=cfg.compute_dtype,
                        param_dtype=cfg.weights_dtype, scale_init=scale_init,
                        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)),
                        name=name)


def residual(cfg: ModelConfig, x: jax.Array, sublayer, norm_layer: nn.Module,
             drop: nn.Module) -> jax.Array:
    """One residual branch: pre-norm x + f(norm(x)), or with `model.post_norm` the original
    Transformer's "residual, then layer norm", norm(x + f(x)) (which needs LR warmup)."""
    if cfg.post_norm:
        return norm_layer(x + drop(sublayer(x)))
    return x + drop(sublayer(norm_layer(x)))


def token_embedding(cfg: ModelConfig, name: str = "embed", features: int = 0) -> nn.Embed:
    """The token table, `features` wide (0 = d_model; ALBERT's factorised embeddings: E)."""
    return nn.Embed(
        num_embeddings=cfg.vocab_size, features=features or cfg.d_model,
        dtype=cfg.compute_dtype, param_dtype=cfg.weights_dtype,
        embedding_init=nn.with_logical_partitioning(
            nn.initializers.normal(cfg.init_std), ("vocab", "embed")),
        name=name)


def tied_logits(embed: nn.Embed, x_BxTxD: jax.Array) -> jax.Array:
    """x @ embedding.T in the compute dtype with float32 logits straight from the matmul
    (`nn.Embed.attend` rounds them to the compute dtype, and a cast back then costs a full
    B x T x V pass). Call after `embed` has been applied once."""
    return jnp.einsum("btd,vd->btv", x_BxTxD.astype(embed.dtype),
                      embed.embedding.astype(embed.dtype), preferred_element_type=jnp.float32)


def sinusoidal(positions_BxT: jax.Array, d: int, dtype) -> jax.Array:
    """Transformer (Vaswani et al.) sin/cos position encodings for arbitrary positions."""
    inv_freq = 1.0 / (10000.0 ** (np.arange(0, d, 2, dtype=np.float32) / d))
    angles_BxTxd = positions_BxT[..., None].astype(jnp.float32) * inv_freq[None, None]
    return jnp.concatenate([jnp.sin(angles_BxTxd), jnp.cos(angles_BxTxd)], -1).astype(dtype)


@flax.struct.dataclass
class Rotary:
    """RoPE's tables for a batch of positions, made once per forward pass (`rotary`) and
    given to every layer's attention in place of the positions, so that no layer recomputes
    the sines and cosines."""
    cos_BxTx1xK: jax.Array      # [cos, cos]
    sin_BxTx1xK: jax.Array      # [-sin, sin]


def rotary(positions_BxT: jax.Array, k: int, theta: float) -> Rotary:
    inv_freq = 1.0 / (theta ** (np.arange(0, k, 2, dtype=np.float32) / k))
    angles_BxTx1xk = (positions_BxT[..., None].astype(jnp.float32) * inv_freq[None, None])[:, :, None]
    cos, sin = jnp.cos(angles_BxTx1xk), jnp.sin(angles_BxTx1xk)
    return Rotary(jnp.concatenate([cos, cos], axis=-1), jnp.concatenate([-sin, sin], axis=-1))


def rope(x_BxTxNxK: jax.Array, positions_BxT: jax.Array | Rotary, theta: float) -> jax.Array:
    """Rotary embedding, half-split ("rotate_half") layout as in Hugging Face Llama:
    [x1, x2] -> [x1 cos - x2 sin, x2 cos + x1 sin], computed as x * [cos, cos] + [x2, x1] *
    [-sin, sin] with the halves as an axis of two and [x2, x1] its reversal: one elementwise
    fusion that XLA writes straight in the layout the attention matmul reads (slicing and
    concatenating the halves instead adds copies and transposes of q and k: 1-5% more memory
    traffic in the tiny f32 train step on CPU, by the form). `positions_BxT` may be the tables
    of `rotary` already."""
    k = x_BxTxNxK.shape[-1]
    tables = positions_BxT if isinstance(positions_BxT, Rotary) else rotary(positions_BxT, k,
                                                                            theta)
    halves = lambda a: a.reshape(*a.shape[:-1], 2, k // 2)   # noqa: E731
    x_BxTxNx2xk = halves(x_BxTxNxK.astype(jnp.float32))
    out = (x_BxTxNx2xk * halves(tables.cos_BxTx1xK)
           + jnp.flip(x_BxTxNx2xk, axis=-2) * halves(tables.sin_BxTx1xK))
    return out.reshape(x_BxTxNxK.shape).astype(x_BxTxNxK.dtype)


class PositionEmbedding(nn.Module):
    """Adds absolute positions (learned or sinusoidal); identity for RoPE models. `features`:
    the width of x (0 = d_model)."""
    cfg: ModelConfig
    features: int = 0

    @nn.compact
    def __call__(self, x_BxTxD: jax.Array, positions_BxT: jax.Array) -> jax.Array:
        cfg = self.cfg
        width = self.features or cfg.d_model
        if cfg.pos == "learned":
            table = nn.Embed(
                cfg.max_len, width, dtype=cfg.compute_dtype, param_dtype=cfg.weights_dtype,
                embedding_init=nn.with_logical_partitioning(
                    nn.initializers.normal(cfg.init_std), ("pos", "embed")),
                name="table")
            return x_BxTxD + table(positions_BxT)
        if cfg.pos == "sinusoidal":
            return x_BxTxD + sinusoidal(positions_BxT, width, cfg.compute_dtype)
        return x_BxTxD


def gelu(cfg: ModelConfig, x: jax.Array) -> jax.Array:
    """GELU of the GELU MLPs and the heads: the tanh approximation, or the exact (erf) one with
    model.mlp='gelu_exact' (BERT's and RoBERTa's original)."""
    return nn.gelu(x, approximate=cfg.mlp != "gelu_exact")


class Mlp(nn.Module):
    """Gated (SwiGLU; GeGLU, T5 v1.1's gated-gelu: gate and up projections fused in one
    kernel) or plain (GELU; ReLU, T5 1.0) feed-forward block. GELU is the tanh approximation."""
    cfg: ModelConfig
    out_std: float

    @nn.compact
    def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
        cfg = self.cfg
        act = {"swiglu": nn.silu, "geglu": nn.gelu, "gelu": nn.gelu, "relu": nn.relu,
               "gelu_exact": lambda x: nn.gelu(x, approximate=False)}[cfg.mlp]
        if cfg.mlp in ("swiglu", "geglu"):
            gate_BxTxF, up_BxTxF = dense(cfg, (2, cfg.d_ff), ("embed", None, "mlp"), name="wi",
                                         split=True)(x_BxTxD)
            h_BxTxF = act(constrain(gate_BxTxF, ("batch", "seq", "act_mlp"))) * constrain(
                up_BxTxF, ("batch", "seq", "act_mlp"))
        else:
            h_BxTxF = act(dense(cfg, cfg.d_ff, ("embed", "mlp"), name="wi")(x_BxTxD))
        h_BxTxF = constrain(h_BxTxF, ("batch", "seq", "act_mlp"))
        out_BxTxD = dense(cfg, cfg.d_model, ("mlp", "embed"), std=self.out_std, name="wo")(h_BxTxF)
        return constrain(out_BxTxD, ("batch", "seq", "act_embed"))


def prepend_prompt(prompt_PxD: jax.Array, x_BxTxD: jax.Array, positions_BxT: jax.Array,
                   segment_ids_BxT: jax.Array | None
                   ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Soft-prompt tuning: P trained vectors before each row's embedded tokens. They take
    positions 0..P-1 (the tokens move up by P) and the row's segment id (one example per row;
    padding on either side), so every token attends to them; callers drop the P positions from
    the output (or keep them, with `prompted_segments`, as a decoder's cross-attention does)."""
    b, p = x_BxTxD.shape[0], prompt_PxD.shape[0]
    prompt_BxPxD = jnp.broadcast_to(prompt_PxD.astype(x_BxTxD.dtype)[None],
                                    (b, p, x_BxTxD.shape[-1]))
    positions_BxP = jnp.broadcast_to(jnp.arange(p, dtype=positions_BxT.dtype), (b, p))
    return (jnp.concatenate([prompt_BxPxD, x_BxTxD], axis=1),
            jnp.concatenate([positions_BxP, positions_BxT + p], axis=1),
            prompted_segments(p, segment_ids_BxT, x_BxTxD.shape[:2]))


def prompted_segments(p: int, segment_ids_BxT: jax.Array | None,
                      shape: tuple[int, int]) -> jax.Array:
    """segment_ids_Bx(P+T) of rows read after a P-vector soft prompt (see `prepend_prompt`)."""
    if segment_ids_BxT is None:
        segment_ids_BxT = jnp.ones(shape, jnp.int32)
    row_B1 = jnp.max(segment_ids_BxT, axis=1, keepdims=True)
    return jnp.concatenate([jnp.broadcast_to(row_B1, (shape[0], p)), segment_ids_BxT], axis=1)


_REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "minimal": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def stack(cfg: ModelConfig, block: type[nn.Module], n: int, x: jax.Array, *args,
          name: str = "layers", **block_attrs) -> jax.Array:
    """Applies `n` blocks `block(cfg, **block_attrs)(x, *args) -> (x, None)` in sequence.

    Call it from a compact method. With `model.scan_layers` the blocks are one `nn.scan`, so
    compile time does not grow with depth and parameters gain a leading "layers" axis; otherwise
    they are unrolled as `{name}_0 .. {name}_{n-1}`. `model.remat` picks what the backward pass
    recomputes instead of storing. With `model.share_layers` (ALBERT) one block `{name}_shared`
    is applied `n` times, scanned or unrolled: its parameters have no "layers" axis.
    """
    if cfg.remat != "none":
        block = nn.remat(block, policy=_REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)
    if cfg.share_layers:
        return _shared_stack(cfg, block, n, x, *args, name=f"{name}_shared", **block_attrs)
    if cfg.scan_layers:
        scanned = nn.scan(
            block, variable_axes={"params": 0, "cache": 0},
            split_rngs={"params": True, "dropout": True},
            in_axes=(nn.broadcast,) * len(args), length=n,
            metadata_params={nn.PARTITION_NAME: "layers"})
        x, _ = scanned(cfg, name=name, **block_attrs)(x, *args)
        return x
    for i in range(n):
        x, _ = block(cfg, name=f"{name}_{i}", **block_attrs)(x, *args)
    return x


def _shared_stack(cfg: ModelConfig, block: type[nn.Module], n: int, x: jax.Array, *args,
                  name: str, **block_attrs) -> jax.Array:
    """ALBERT's cross-layer sharing: one block's parameters, applied `n` times (dropout draws
    fresh masks at each application)."""
    if cfg.scan_layers:
        scanned = nn.scan(
            block, variable_broadcast="params", split_rngs={"params": False, "dropout": True},
            in_axes=(nn.broadcast,) * len(args), length=n)
        x, _ = scanned(cfg, name=name, **block_attrs)(x, *args)
        return x
    layer = block(cfg, name=name, **block_attrs)
    for _ in range(n):
        x, _ = layer(x, *args)
    return x
