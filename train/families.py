"""The one place per model family and per training objective.

A `Family` says how to build its Flax module (model/) and the inputs that create its
parameters, how to count its training FLOPs, whether and how it writes text (the stepper the
decoding loops drive, and how a prompt enters the model) and which Hugging Face layouts it maps
to. An `Objective` says which family it trains, its loss (train/objectives.py), its synthetic
batch (train/synthetic.py), its decoder length and whether bits per byte are defined for it.
The rows an objective's data pipeline makes are data/pipeline.py's `ROWS`, since data/ imports
nothing from train/.

Adding a family: its module in model/ (and its name in model.config.FAMILIES), a `Family` here,
its objectives' losses, rows and synthetic batches, and their tests. Nothing else branches on a
family or objective name.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict

from data.plm import predict_slots
from errors import ConfigError
from model.config import FAMILIES as MODEL_FAMILIES, ModelConfig
from model.decoder import DecoderLM
from model.electra import ElectraLM
from model.encoder import EncoderLM
from model.encoder_decoder import EncoderDecoderLM
from model.heads import TaskModel
from model.xlnet import XLNetLM
from train import objectives as losses, synthetic
from train.decoding import steppers
from train.hf import albert as hf_albert, bert as hf_bert, decoder as hf_decoder, \
    roberta as hf_roberta, t5 as hf_t5
from train.hf.layout import Layout

# How a family writes text: "continue" a prompt ([BOS] + prompt, decoder-only), "encode" it
# (prompt + [EOS] into the encoder, output decoded from [BOS]), or None (no text: encoders).
PROMPTING = ("continue", "encode")


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    module: Callable[..., nn.Module]               # module(cfg) or module(cfg, decode=...)
    n_inputs: int                                  # positional token arrays `init` needs
    flops: Callable[[ModelConfig, int, int, int | None], float]
    prompting: str | None = None                   # see PROMPTING
    stepper: Callable[..., steppers.Stepper] | None = None   # (cfg, use_cache, window, keep)
    hf_layouts: tuple[Layout, ...] = ()
    # task heads (model/heads.py): hidden states of (module, tokens, positions, segment_ids,
    # type_ids, train), how a sequence is pooled, and the rows of labelled tasks (data/tasks.py)
    features: Callable[..., jax.Array] | None = None
    pooling: str = "first"
    task_layout: str = "cls"

    def build(self, cfg: ModelConfig, *, decode: bool = False) -> nn.Module:
        """The Flax module; `decode=True` (KV cache) for the families that write text."""
        if not decode:
            return self.module(cfg)
        if self.stepper is None:
            raise ConfigError(f"model.family={self.name!r} does not decode autoregressively")
        return self.module(cfg, decode=True)


@dataclasses.dataclass(frozen=True)
class Objective:
    name: str
    family: str
    loss: losses.Objective
    synthetic: Callable[[int, int, int, int], dict[str, Any]]   # (rows, length, vocab, seed)
    decoder_length: Callable[[int], int] | None = None          # seq_len -> decoder tokens
    bits_per_byte: bool = False        # its targets are the text itself, so bytes are defined
    head: str | None = None            # a task head of model/heads.py (None: the family's LM)
    carriers: tuple[str, ...] = ()     # task objectives: the families that can train them
    weights: tuple[tuple[str, str], ...] = ()   # (loss keyword, train.* key): loss weights


def _attention(layers: int, cfg: ModelConfig, context: int) -> float:
    """PaLM's attention FLOPs per query token, forward + backward: 12 * L * heads * K * context."""
    return 12.0 * layers * cfg.n_heads * cfg.head_size * context


# Training FLOPs per input token: 6N for the matmuls forward+backward plus attention (PaLM
# appendix B; N counts every parameter, embeddings included, as shared/bench's reference does).

def _stack_flops(cfg: ModelConfig, n_params: int, seq_len: int, _decoder_len=None) -> float:
    return 6.0 * n_params + _attention(cfg.n_layers, cfg, seq_len)


def _encoder_flops(cfg: ModelConfig, n_params: int, seq_len: int, _decoder_len=None) -> float:
    """ALBERT's shared block (model.share_layers) is one set of parameters doing n_layers
    blocks' work: it counts n_layers times. (A factorised embedding's projection is in N.)"""
    if not cfg.share_layers:
        return _stack_flops(cfg, n_params, seq_len)
    shapes = jax.eval_shape(lambda: build(cfg).init(jax.random.PRNGKey(0), *init_inputs(cfg)))
    n_block = sum(x.size for x in jax.tree.leaves(shapes["params"]["encoder"]["layers_shared"]))
    return _stack_flops(cfg, n_params + (cfg.n_layers - 1) * n_block, seq_len)


def _electra_flops(cfg: ModelConfig, n_params: int, seq_len: int, _decoder_len=None) -> float:
    """The generator's attention too (its parameters are in N)."""
    generator = cfg.generator_config()
    return _stack_flops(cfg, n_params, seq_len) + _attention(generator.n_layers, generator,
                                                             seq_len)


def _encoder_decoder_flops(cfg: ModelConfig, n_params: int, seq_len: int,
                           decoder_len: int | None = None) -> float:
    """Per encoder token (data.seq_len, the unit of tokens/s) with `decoder_len` decoder tokens
    per row (default seq_len): encoder parameters work on seq_len tokens, decoder parameters and
    the output projection on decoder_len, token lookups are free; plus self- and
    cross-attention. T5's relative position bias (model/relative.py) is a gather and an add per
    attention logit, no matmul: left out (XLA counts 47.22 GFLOP a t5_tiny v1.1 step with it,
    47.24 with RoPE in its place; its 32 x heads tables are in N, ~1e-5 of it)."""
    t, s = seq_len, decoder_len or seq_len
    shapes = jax.eval_shape(lambda: build(cfg).init(jax.random.PRNGKey(0), *init_inputs(cfg)))
    n_decoder = sum(x.size for x in jax.tree.leaves(shapes["params"]["decoder"]))
    n_lookup = cfg.vocab_size * cfg.d_model                  # the token embedding table
    n_output = 0 if cfg.tie_embeddings else cfg.vocab_size * cfg.d_model   # untied lm_head
    n_encoder = n_params - n_decoder - n_lookup - n_output
    matmuls = 6.0 * (n_encoder * t + (n_decoder + cfg.vocab_size * cfg.d_model) * s)
    attention = _attention(cfg.n_layers, cfg, t) * t + \
        _attention(cfg.decoder_layers, cfg, s + t) * s      # decoder: self + cross
    return (matmuls + attention) / t


def _xlnet_flops(cfg: ModelConfig, n_params: int, seq_len: int,
                 query_len: int | None = None) -> float:
    """Per input token, with `query_len` query-stream positions per row (default: those of
    data.plm.predict_ratio's default). The query stream runs every block on P positions and
    the output projection on them; the content stream runs every block on T positions, except
    that only the last block's keys and values are ever read (its queries, output projection
    and MLP feed nothing, and XLA drops them from an unrolled stack); token lookups are free.
    Attention: P queries per block and T per block but the last, each over T keys (the
    permutation masks skip none)."""
    t = seq_len
    p = predict_slots(t, synthetic.PLM_RATIO) if query_len is None else query_len
    shapes = jax.eval_shape(lambda: build(cfg).init(jax.random.PRNGKey(0), *init_inputs(cfg)))
    n_block = n_kv = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(shapes["params"])[0]:
        names = jax.tree_util.keystr(path)
        if "['layers" in names:
            n_block += leaf.size
            n_kv += leaf.size if "['key']" in names or "['value']" in names else 0
    table = cfg.vocab_size * cfg.d_model
    n_rest = n_params - n_block - table * (1 if cfg.tie_embeddings else 2)   # final norm, mask
    last_unread = (n_block - n_kv) / cfg.n_layers
    matmuls = 6.0 * ((n_block + n_rest) * p + table * p + (n_block - last_unread) * t)
    attention = _attention(cfg.n_layers, cfg, t) * p + _attention(cfg.n_layers - 1, cfg, t) * t
    return (matmuls + attention) / t


# (module, tokens, positions, segment ids, type ids, train, **soft prompt) -> h_BxTxD
def _decoder_features(m, tokens, positions, segments, types, train, **prompt):
    return m(tokens, positions, segments, train=train, hidden=True, **prompt)


def _encoder_features(m, tokens, positions, segments, types, train, **prompt):
    return m.encode(tokens, positions, segments, types, train=train, **prompt)


def _t5_features(m, tokens, positions, segments, types, train, **prompt):
    return m.encode(tokens, positions, segments, train=train, **prompt)


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("decoder", DecoderLM, n_inputs=1, flops=_stack_flops, prompting="continue",
           stepper=steppers.decoder_stepper, hf_layouts=(hf_decoder.LLAMA, hf_decoder.GPT2),
           features=_decoder_features, pooling="last", task_layout="causal"),
    Family("encoder", EncoderLM, n_inputs=1, flops=_encoder_flops,
           hf_layouts=(hf_bert.BERT, hf_roberta.ROBERTA, hf_albert.ALBERT),
           features=_encoder_features, pooling="first", task_layout="cls"),
    Family("electra", ElectraLM, n_inputs=1, flops=_electra_flops,
           features=_encoder_features, pooling="first", task_layout="cls"),
    Family("encoder_decoder", EncoderDecoderLM, n_inputs=2, flops=_encoder_decoder_flops,
           prompting="encode", stepper=steppers.encoder_decoder_stepper,
           hf_layouts=(hf_t5.T5,), features=_t5_features, pooling="mean", task_layout="seq2seq"),
    # XLNet: pretraining only (no task head, no decoding), see model/xlnet.py
    Family("xlnet", XLNetLM, n_inputs=1, flops=_xlnet_flops),
)}
assert set(FAMILIES) == set(MODEL_FAMILIES), "every model family needs a Family record"

OBJECTIVES: dict[str, Objective] = {o.name: o for o in (
    Objective("clm", "decoder", losses.clm, synthetic.clm_batch, bits_per_byte=True),
    Objective("mlm", "encoder", losses.mlm,
              lambda *a: synthetic.mlm_batch(*a, pairs=True),
              weights=(("pair_weight", "pair_weight"),)),
    Objective("electra", "electra", losses.electra,
              lambda *a: synthetic.mlm_batch(*a, pairs=False),
              weights=(("discriminator_weight", "discriminator_weight"),)),
    Objective("span_corruption", "encoder_decoder", losses.seq2seq,
              synthetic.span_corruption_batch,
              decoder_length=lambda t: synthetic.span_corruption_length(t)[1]),
    Objective("prefix_lm", "encoder_decoder", losses.seq2seq, synthetic.prefix_lm_batch,
              decoder_length=lambda t: t),
    # BART: noised text in, the text out (data/noise.py); decoder length data.target_len or T
    Objective("denoise", "encoder_decoder", losses.seq2seq, synthetic.denoise_batch,
              decoder_length=lambda t: t),
    # decoder_length: XLNet's query stream, P of T positions (synthetic batches: K = 6)
    Objective("plm", "xlnet", losses.plm, synthetic.plm_batch,
              decoder_length=lambda t: predict_slots(t, synthetic.PLM_RATIO)),
)}


# Fine-tuning tasks (data/tasks.py has their records and rows): a head on any family that
# carries it, or (text2text) the family's own LM on input -> target rows.
TASKS: dict[str, Objective] = {o.name: o for o in (
    Objective("classify", "", losses.classify, synthetic.classify_batch, head="classify",
              carriers=tuple(f.name for f in FAMILIES.values() if f.features)),
    Objective("tag", "", losses.tag, synthetic.tag_batch, head="tag",
              carriers=tuple(f.name for f in FAMILIES.values() if f.features)),
    Objective("text2text", "", losses.text2text, synthetic.clm_batch,
              carriers=tuple(f.name for f in FAMILIES.values() if f.prompting)),
)}


def trains(objective_name: str, family_name: str) -> bool:
    """Whether `objective_name` can train a `family_name` model."""
    o = objective(objective_name)
    return family_name in o.carriers if o.carriers else o.family == family_name


def family(cfg_or_name: ModelConfig | str) -> Family:
    """The record of a family (by name, or of a ModelConfig); an unknown name is a ConfigError."""
    name = cfg_or_name if isinstance(cfg_or_name, str) else cfg_or_name.family
    if name not in FAMILIES:
        raise ConfigError(f"model.family={name!r}: choose one of {tuple(FAMILIES)}")
    return FAMILIES[name]


def objective(name: str) -> Objective:
    if name in TASKS:
        return TASKS[name]
    if name not in OBJECTIVES:
        raise ConfigError(f"train.objective={name!r}: choose one of "
                          f"{tuple(OBJECTIVES) + tuple(TASKS)}")
    return OBJECTIVES[name]


def objectives_of(family_name: str) -> tuple[str, ...]:
    """The objectives that train a family."""
    return tuple(o.name for o in (*OBJECTIVES.values(), *TASKS.values())
                 if trains(o.name, family_name))


def loss(config: ConfigDict) -> losses.Objective:
    """`train.objective`'s loss with the config's loss weights bound (train.pair_weight,
    train.discriminator_weight); the step passes z_loss itself."""
    weights = loss_weights(config)
    loss = objective(config.train.objective).loss
    return functools.partial(loss, **weights) if weights else loss


def loss_weights(config: ConfigDict) -> dict[str, float]:
    """The keyword arguments of `train.objective`'s loss that the config sets (its lambdas)."""
    o = objective(config.train.objective)
    return {kw: float(config.train[key]) for kw, key in o.weights}


def build(cfg: ModelConfig, *, decode: bool = False) -> nn.Module:
    """The Flax module of `cfg.family`."""
    return family(cfg).build(cfg, decode=decode)


def build_for(cfg: ModelConfig, objective_name: str, n_labels: int = 0,
              head_dropout: float = 0.0, n_prompt: int = 0) -> nn.Module:
    """The module an objective trains: the family's own, or a TaskModel with the task's head."""
    o = objective(objective_name)
    if o.head is None:
        return build(cfg)
    f = family(cfg)
    if f.features is None:
        raise ConfigError(f"a model.family={f.name!r} backbone cannot carry a {o.head} head; "
                          f"use one of {o.carriers}")
    if n_prompt and f.name == "electra":
        raise ConfigError("finetune.mode=prompt works on decoder, encoder and encoder_decoder "
                          "backbones, not electra")
    return TaskModel(cfg, f.module, f.features, f.pooling, o.head, n_labels, head_dropout,
                     n_prompt)


def init_inputs(cfg: ModelConfig, batch: int = 1, length: int = 8,
                model: nn.Module | None = None) -> tuple:
    """Positional inputs that `build(cfg).init` (or `model.init`) needs to create every
    parameter."""
    n = getattr(model, "n_inputs", None) or family(cfg).n_inputs
    return (jnp.zeros((batch, length), jnp.int32),) * n


def flops_per_token(cfg: ModelConfig, n_params: int, seq_len: int,
                    decoder_len: int | None = None) -> float:
    """Training FLOPs per input token of a model of `cfg` with `n_params` parameters."""
    return family(cfg).flops(cfg, n_params, seq_len, decoder_len)


def decoder_length(config: ConfigDict) -> int | None:
    """Decoder tokens per row of the synthetic batches of `config` (None: no decoder)."""
    length = objective(config.train.objective).decoder_length
    return length(config.data.seq_len) if length else None


def synthetic_batch(config: ConfigDict, sharding, seed: int = 1) -> dict[str, jax.Array]:
    """A global batch of data.batch_size rows of data.seq_len tokens for `train.objective`."""
    name = config.train.objective
    if name != "clm" and config.model.vocab_size < 4 * synthetic.FIRST_TOKEN:
        raise ConfigError(f"synthetic {name} batches need model.vocab_size >= "
                          f"{4 * synthetic.FIRST_TOKEN}, got {config.model.vocab_size}")
    rows = objective(name).synthetic(config.data.batch_size, config.data.seq_len,
                                     config.model.vocab_size, seed)
    return jax.device_put({k: np.asarray(v) for k, v in rows.items()}, sharding)
