"""Integer quantization of the dense projections, with qwix (Google's JAX quantization library).

Two ways in, one numerics (symmetric absmax, one scale per output channel of each kernel, and per
token of each input when activations are quantized):

- Post-training (`quant.mode=ptq`, written by `python -m train.compress quantize`): every
  `model.layers.Dense` kernel in the params is a `qwix.QArray` (int8 or int4 values + float32
  scales; a scanned stack keeps its leading layer axis, one scale row per block). `Dense` sees
  the QArray and calls `quantized_matmul`, qwix's quantized `dot_general`: weights only, the kernel is
  dequantized into the matmul (XLA fuses it); with int8 activations, int8 x int8 products
  rescaled on output. Because the params carry the quantization, every code path that applies
  the model (eval, choices, the decoding steppers with their KV cache) runs it with no wrapper.
- Quantization-aware training (`quant.mode=qat`): `qat_model` wraps the model with qwix's
  `QtProvider` (`qwix.quantize_model`), which fake-quantizes the same matmuls in the forward
  pass with straight-through gradients; the params stay float. `quantize_params` of such a run
  with the same settings gives the PTQ model whose logits match the QAT model's.

Embedding tables, norms, biases and attention's activation-activation einsums stay float.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import qwix

from model.layers import INPUT_SCALE, QTYPES, Dense
from model.wrapper import ModelWrapper
KERNEL = "kernel"   # the name of model.layers.Dense's parameter (the only "kernel" in Loom)


def is_quantized(params: Any) -> bool:
    """Whether any leaf of `params` is a quantized kernel."""
    return any(isinstance(x, qwix.QArray) for x in jax.tree.leaves(
        params, is_leaf=lambda x: isinstance(x, qwix.QArray)))


def _kernels(params: Any, n_inputs: dict[tuple[str, ...], tuple[int, int]]):
    """(path, keys, leaf, (inputs, rank)) for every Dense kernel; `n_inputs` maps a kernel's
    path to how many of its leading axes the Dense contracts and the kernel's rank in one
    call (a scanned stack's stored kernel has one more axis, the layers)."""
    for path, leaf in jax.tree_util.tree_flatten_with_path(
            params, is_leaf=lambda x: isinstance(x, (nn.Partitioned, qwix.QArray)))[0]:
        keys = tuple(str(getattr(k, "key", k)) for k in path)
        if keys and keys[-1] == KERNEL:
            yield path, keys, leaf, n_inputs[keys]


def dense_inputs(model: nn.Module, *init_args) -> dict[tuple[str, ...], tuple[int, int]]:
    """Kernel path -> (contracted input axes, rank in one call) of every Dense of `model`,
    from an abstract init (nothing is allocated)."""
    found: dict[tuple[str, ...], int] = {}

    def record(next_fun, args, kwargs, context):
        if isinstance(context.module, Dense) and context.method_name == "__call__":
            path = tuple(p for p in context.module.path)
            module = context.module
            found[path + (KERNEL,)] = (len(module.axis), len(module.axis) + len(module.features))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *init_args))
    return found


def _quantize_one(value: jax.Array, lead: int, n_in: int, weights: str) -> qwix.QArray:
    """Per output channel (and per block of a scanned stack): the contracted axes share a scale."""
    channelwise = list(range(lead)) + list(range(lead + n_in, value.ndim))
    return qwix.quantize(value, QTYPES[weights], channelwise_axes=channelwise,
                         scale_dtype=jnp.float32)


def quantize_params(params: Any, n_inputs: dict[tuple[str, ...], tuple[int, int]],
                    weights: str) -> Any:
    """`params` with every Dense kernel a QArray. Works on plain arrays and on boxed
    (nn.Partitioned) abstract params alike: a boxed kernel becomes a QArray of boxed values
    and scales (a scale's size-1 contracted axes unnamed), so shardings follow the names."""
    flat = {}
    for _, keys, leaf, (n_in, rank) in _kernels(params, n_inputs):
        lead = nn.unbox(leaf).ndim - rank    # 1 for a scanned stack's kernels
        if isinstance(leaf, nn.Partitioned):
            q = _quantize_one(leaf.value, lead, n_in, weights)
            scale_names = tuple(None if n == 1 and s != 1 else name for name, n, s in
                                zip(leaf.names, q.scale.shape, leaf.value.shape))
            flat[keys] = dataclasses.replace(
                q, qvalue=leaf.replace(value=q.qvalue),
                scale=leaf.replace(value=q.scale, names=scale_names))
        else:
            flat[keys] = _quantize_one(leaf, lead, n_in, weights)
    return _replace(params, flat)


class InputRecorder:
    """Records the input absmax of every Dense call while active (`with recorder:`), for
    static activation scales. Values arrive through `jax.debug.callback` when the traced
    computation runs (ordered, so a scanned stack's blocks arrive in layer order); trace and run
    on one device, so each call reports once."""

    def __init__(self):
        self.seen: dict[tuple[str, ...], list[float]] = {}
        self._context = None

    def _record(self, path, absmax):
        self.seen.setdefault(path, []).append(float(absmax))

    def __enter__(self):
        def intercept(next_fun, args, kwargs, context):
            module = context.module
            if isinstance(module, Dense) and context.method_name == "__call__":
                path = tuple(module.path) + (KERNEL,)
                absmax = jnp.max(jnp.abs(args[0].astype(jnp.float32)))
                jax.debug.callback(lambda a, path=path: self._record(path, a), absmax,
                                   ordered=True)
            return next_fun(*args, **kwargs)
        self._context = nn.intercept_methods(intercept)
        self._context.__enter__()
        return self

    def __exit__(self, *exc):
        return self._context.__exit__(*exc)

    def scales(self, params: Any, n_inputs: dict[tuple[str, ...], tuple[int, int]],
               activations: str) -> dict[tuple[str, ...], jax.Array]:
        """Kernel path -> its static input scale (absmax over every recorded call / qmax), one
        per block of a scanned stack."""
        qmax = float(jnp.iinfo(QTYPES[activations]).max)
        out = {}
        for _, keys, leaf, (_, rank) in _kernels(params, n_inputs):
            values = jnp.asarray(self.seen.get(keys, [1.0]), jnp.float32)
            layers = nn.unbox(leaf).shape[0] if nn.unbox(leaf).ndim > rank else 0
            per_call = values.reshape(-1, layers).max(0) if layers else values.max()
            out[keys] = jnp.maximum(per_call, 1e-6) / qmax
        return out


def with_input_scales(params: Any, scales: dict[tuple[str, ...], Any]) -> Any:
    """`params` with each Dense's static input scale beside its kernel (`input_scale`)."""
    flat = {keys[:-1]: scale for keys, scale in scales.items()}

    def add(tree, prefix=()):
        if isinstance(tree, qwix.QArray) or not hasattr(tree, "items"):
            return tree
        out = {k: add(v, prefix + (str(k),)) for k, v in tree.items()}
        if prefix in flat:
            out[INPUT_SCALE] = flat[prefix]
        return out
    return add(params)


def dequantize_params(params: Any) -> Any:
    """Float params again (float32 kernels): what Hugging Face export writes."""
    return jax.tree.map(lambda x: qwix.dequantize(x).astype(jnp.float32)
                        if isinstance(x, qwix.QArray) else x, params,
                        is_leaf=lambda x: isinstance(x, qwix.QArray))


def _replace(tree: Any, flat: dict[tuple[str, ...], Any], prefix: tuple[str, ...] = ()) -> Any:
    if prefix in flat:
        return flat[prefix]
    if isinstance(tree, dict) or hasattr(tree, "items") and not isinstance(tree, qwix.QArray):
        return {k: _replace(v, flat, prefix + (str(k),)) for k, v in tree.items()}
    return tree


def qat_rule(weights: str, activations: str) -> qwix.QtRule:
    """The matmuls QAT fake-quantizes: every Dense's dot_general (attention's einsums and the
    tied output embedding are left float, as in PTQ)."""
    return qwix.QtRule(module_path=".*", op_names=("dot_general",),
                       weight_qtype=QTYPES[weights],
                       act_qtype=QTYPES[activations] if activations else None)


@dataclasses.dataclass(frozen=True)
class PtqModel(ModelWrapper):
    """The model of a post-training-quantized run: `init` gives the params with every Dense
    kernel a QArray (what its checkpoint holds and restores into); `apply` is the model's own,
    since Dense runs a QArray kernel's quantized matmul by itself."""
    weights: str
    calibrated: bool = False   # static input scales (quant.calibration_batches > 0)

    def init(self, rng, *args, **kwargs):
        variables = self.inner.init(rng, *args, **kwargs)
        n_inputs = dense_inputs(self.inner, *args)
        params = quantize_params(variables["params"], n_inputs, self.weights)
        if self.calibrated:   # placeholders of the right shapes: the checkpoint has the values
            scales = {}
            for _, keys, leaf, (_, rank) in _kernels(variables["params"], n_inputs):
                lead = leaf.value.ndim - rank
                scales[keys] = leaf.replace(value=jnp.ones(leaf.value.shape[:lead], jnp.float32),
                                            names=tuple(leaf.names[:lead]))
            params = with_input_scales(params, scales)
        return {**variables, "params": params}


def wrap(model: nn.Module, mode: str, weights: str, activations: str,
         calibrated: bool = False):
    """The model a run with quant.mode=`mode` trains or evaluates."""
    if mode == "ptq":
        return PtqModel(model, weights, calibrated)
    if mode == "qat":
        return QatModel(model, weights, activations)
    return model


@dataclasses.dataclass(frozen=True)
class QatModel(ModelWrapper):
    """A model whose Dense matmuls are fake-quantized by qwix's QtProvider (straight-through
    gradients); `init` and `apply` as a Flax module's, params unchanged (float)."""
    weights: str
    activations: str

    def _quantized(self) -> nn.Module:
        methods = [m for m in ("__call__", "generator_logits", "discriminator_logits", "encode",
                               "decoder_logits") if callable(getattr(type(self.inner), m, None))]
        provider = qwix.QtProvider([qat_rule(self.weights, self.activations)])
        return qwix.quantize_model(self.inner, provider, methods=methods)

    def apply(self, variables, *args, method=None, **kwargs):
        if method is not None and not isinstance(method, str):
            method = method.__name__   # the quantized class's own (intercepted) method
        return self._quantized().apply(variables, *args, method=method, **kwargs)
