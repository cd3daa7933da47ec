"""Loom's encoder in the Hugging Face RoBERTa layout (`RobertaForMaskedLM`).

RoBERTa is BERT's post-LN encoder trained without a sentence-pair objective, so its layout
has no pooler or pair head: Loom's (untrained when `data.mlm.sentence_pairs=none`) pair head is
left out on export and comes back as zeros on import. Two details of the layout: positions
start at padding_idx + 1 (`pad_token_id` is Loom's [PAD], 0), so the exported position table
has padding_idx + 1 unused rows before Loom's, and Hugging Face derives positions from the
token ids (a [PAD] id in the middle of a row gets position padding_idx, where Loom counts on);
the GELU is the exact one (`model.mlp='gelu_exact'`: RoBERTa's MLM head hard-codes it); and the
token-type table has however many types the model has (1 for RoBERTa's own checkpoints,
`model.type_vocab_size=1`).
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from data.tokenizer import PAD
from errors import ConversionError, ModelConfigError
from model.config import ModelConfig
from train.hf.bert import _dense, _norm, _output_biases
from train.hf.layout import Layout, Tensor, linear, require, require_plain_heads, same, \
    unsupported

_PAIR_HEAD = ("pair_head/pooler/kernel", "pair_head/pooler/bias", "pair_head/out/kernel",
              "pair_head/out/bias")


def _check(cfg: ModelConfig) -> None:
    require(cfg, "roberta", "encoder", dict(post_norm=True, norm="layernorm", mlp="gelu_exact",
                                            pos="learned", use_bias=True, embed_dim=0,
                                            share_layers=False),
            " (RoBERTa's blocks are BERT's: post-LN with layernorm, learned positions and biases; "
            "its MLM head's GELU is always the exact one)")
    require_plain_heads(cfg, "roberta")
    if cfg.type_vocab_size < 1:
        raise ModelConfigError("model.type_vocab_size=0 has no equivalent in the Hugging Face "
                               "roberta layout, which always has token-type embeddings (set 1)")


def _positions() -> Tensor:
    """Loom's table (max_len, D) <-> RoBERTa's, whose first padding_idx + 1 rows are unused."""
    def to_hf(xs):
        return [np.concatenate([np.zeros((PAD + 1,) + xs[0].shape[1:], xs[0].dtype), xs[0]])]
    return Tensor(("embeddings/pos/table/embedding",),
                  ("roberta.embeddings.position_embeddings.weight",), to_hf,
                  lambda ws, shapes: [ws[0][len(ws[0]) - shapes[0][0]:]])


def _no_pair_head() -> Tensor:
    """No Hugging Face tensor: exported nowhere, imported as zeros."""
    return Tensor(_PAIR_HEAD, (), lambda xs: [],
                  lambda ws, shapes: [np.zeros(s, np.float32) for s in shapes])


def _tensors(cfg: ModelConfig) -> list[Tensor]:
    tensors = [same("embeddings/embed/embedding", "roberta.embeddings.word_embeddings.weight"),
               _positions(),
               same("embeddings/type_embed/embedding",
                    "roberta.embeddings.token_type_embeddings.weight"),
               *_norm("embeddings/norm", "roberta.embeddings.LayerNorm")]
    for i in range(cfg.n_layers):
        loom, hf = f"encoder/layers_{i}/", f"roberta.encoder.layer.{i}."
        tensors += [
            *_dense(loom + "attn/query", hf + "attention.self.query"),    # (D, N, K)
            *_dense(loom + "attn/key", hf + "attention.self.key"),
            *_dense(loom + "attn/value", hf + "attention.self.value"),
            *_dense(loom + "attn/out", hf + "attention.output.dense", in_axes=2),
            *_norm(loom + "attn_norm", hf + "attention.output.LayerNorm"),
            *_dense(loom + "mlp/wi", hf + "intermediate.dense"),
            *_dense(loom + "mlp/wo", hf + "output.dense"),
            *_norm(loom + "mlp_norm", hf + "output.LayerNorm"),
        ]
    tensors += [_no_pair_head(), *_dense("mlm_head/transform", "lm_head.dense"),
                *_norm("mlm_head/norm", "lm_head.layer_norm")]
    if cfg.tie_embeddings:
        return tensors + [same("mlm_head/bias", "lm_head.bias")]
    return tensors + [linear("mlm_head/out/kernel", "lm_head.decoder.weight"),
                      _output_biases("lm_head.decoder.bias", "lm_head.bias")]


def _config(cfg: ModelConfig) -> dict[str, Any]:
    return dict(
        architectures=["RobertaForMaskedLM"], model_type="roberta", vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads, intermediate_size=cfg.d_ff, hidden_act="gelu",
        hidden_dropout_prob=cfg.dropout, attention_probs_dropout_prob=0.0,
        max_position_embeddings=cfg.max_len + PAD + 1, type_vocab_size=cfg.type_vocab_size,
        layer_norm_eps=cfg.norm_eps, position_embedding_type="absolute", pad_token_id=PAD,
        tie_word_embeddings=cfg.tie_embeddings, initializer_range=cfg.init_std,
        torch_dtype=cfg.param_dtype)


def _keys(hf: Mapping[str, Any]) -> dict[str, Any]:
    if hf.get("hidden_act", "gelu") != "gelu":
        raise ConversionError(f"config.json has hidden_act={hf.get('hidden_act')!r}; a RoBERTa "
                              "MLM head's GELU is the exact one, so Loom maps only "
                              "hidden_act='gelu' (model.mlp='gelu_exact')")
    unsupported(hf, "position_embedding_type", "absolute", "absolute")
    unsupported(hf, "is_decoder", False, False)
    pad = hf.get("pad_token_id", 1)
    return dict(vocab_size=hf["vocab_size"], d_model=hf.get("hidden_size", 768),
                n_heads=hf.get("num_attention_heads", 12), n_kv_heads=0, head_dim=0,
                n_layers=hf.get("num_hidden_layers", 12), d_ff=hf.get("intermediate_size", 3072),
                mlp="gelu_exact", norm="layernorm", norm_eps=hf.get("layer_norm_eps", 1e-12),
                pos="learned", max_len=hf.get("max_position_embeddings", 512) - pad - 1,
                tie_embeddings=hf.get("tie_word_embeddings", True), use_bias=True,
                post_norm=True, type_vocab_size=hf.get("type_vocab_size", 2), embed_dim=0,
                share_layers=False)


ROBERTA = Layout(name="roberta", model_type="roberta", architecture="RobertaForMaskedLM",
                 family="encoder", check=_check, tensors=_tensors, hf_config=_config,
                 model_keys=_keys, objective="mlm", stacks=("encoder/layers",),
                 prefix="roberta.", heads=("lm_head.",),
                 ignored=r"position_ids$|token_type_ids$|^lm_head\.decoder\.(weight|bias)$")
