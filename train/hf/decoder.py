"""Loom's decoder in the Hugging Face Llama and GPT-2 layouts.

Llama: rmsnorm, SwiGLU, RoPE, no biases; grouped KV heads and tied or untied embeddings map to
`num_key_value_heads` and `tie_word_embeddings`. Loom's RoPE rotates the two halves of each head
("rotate_half"), as Hugging Face's Llama does, so q and k are copied without the permutation
Meta-format checkpoints need (tests/test_export.py checks this numerically). GPT-2: layernorm,
tanh-approximated GELU ("gelu_new"), learned positions, biases, tied embeddings, q/k/v fused in
one `Conv1D` whose weights are stored (in, out).
"""
from __future__ import annotations

from typing import Any, Mapping

from data.tokenizer import BOS, EOS, PAD
from errors import ConversionError
from model.config import ModelConfig
from train.hf.layout import Layout, Tensor, columns, linear, require, require_plain_heads, \
    same, unstacked, unsupported


def _tokens(cfg: ModelConfig) -> dict[str, Any]:
    return dict(vocab_size=cfg.vocab_size, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD,
                tie_word_embeddings=cfg.tie_embeddings, initializer_range=cfg.init_std,
                torch_dtype=cfg.param_dtype)


# ---- Llama ----

def _llama_check(cfg: ModelConfig) -> None:
    require(cfg, "llama", "decoder", dict(post_norm=False))   # both layouts are pre-norm
    require(cfg, "llama", "decoder", dict(norm="rmsnorm", mlp="swiglu", pos="rope",
                                          use_bias=False),
            " (a layernorm/gelu/learned-position model with biases fits --layout gpt2)")


def _llama_tensors(cfg: ModelConfig) -> list[Tensor]:
    tensors = [same("embed/embedding", "model.embed_tokens.weight"),
               same("final_norm/scale", "model.norm.weight")]
    if not cfg.tie_embeddings:
        tensors.append(linear("lm_head/kernel", "lm_head.weight"))
    for i in range(cfg.n_layers):
        loom, hf = f"layers_{i}/", f"model.layers.{i}."
        tensors += [
            same(loom + "attn_norm/scale", hf + "input_layernorm.weight"),
            linear(loom + "attn/query/kernel", hf + "self_attn.q_proj.weight"),  # (D,N,K)
            linear(loom + "attn/key/kernel", hf + "self_attn.k_proj.weight"),    # (D,G,K)
            linear(loom + "attn/value/kernel", hf + "self_attn.v_proj.weight"),
            linear(loom + "attn/out/kernel", hf + "self_attn.o_proj.weight", in_axes=2),
            same(loom + "mlp_norm/scale", hf + "post_attention_layernorm.weight"),
            unstacked(loom + "mlp/wi/kernel",  # (D, 2, F): [:, 0] gate (silu), [:, 1] up
                      (hf + "mlp.gate_proj.weight", hf + "mlp.up_proj.weight"), axis=1),
            linear(loom + "mlp/wo/kernel", hf + "mlp.down_proj.weight"),
        ]
    return tensors


def _llama_config(cfg: ModelConfig) -> dict[str, Any]:
    return dict(
        architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=cfg.d_model,
        intermediate_size=cfg.d_ff, num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.kv_heads,
        head_dim=cfg.head_size, hidden_act="silu", max_position_embeddings=cfg.max_len,
        rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta, rope_scaling=None,
        attention_bias=False, mlp_bias=False, attention_dropout=0.0, **_tokens(cfg))


def _llama_keys(hf: Mapping[str, Any]) -> dict[str, Any]:
    unsupported(hf, "hidden_act", "silu", "silu")
    unsupported(hf, "attention_bias", False, False)
    unsupported(hf, "mlp_bias", False, False)
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ConversionError(f"config.json scales RoPE ({rope}); Loom supports plain RoPE only")
    d, n = hf["hidden_size"], hf["num_attention_heads"]
    g = hf.get("num_key_value_heads") or n
    k = hf.get("head_dim") or d // n
    return dict(vocab_size=hf["vocab_size"], d_model=d, n_heads=n, n_kv_heads=0 if g == n else g,
                head_dim=0 if k * n == d else k, n_layers=hf["num_hidden_layers"],
                d_ff=hf["intermediate_size"], mlp="swiglu", norm="rmsnorm",
                norm_eps=hf.get("rms_norm_eps", 1e-6), pos="rope",
                rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
                max_len=hf.get("max_position_embeddings", 2048),
                tie_embeddings=hf.get("tie_word_embeddings", False), use_bias=False)


LLAMA = Layout(name="llama", model_type="llama", architecture="LlamaForCausalLM",
               family="decoder", check=_llama_check, tensors=_llama_tensors,
               hf_config=_llama_config, model_keys=_llama_keys, objective="clm", prefix="model.",
               ignored=r"rotary_emb\.inv_freq$|^lm_head\.weight$")


# ---- GPT-2 ----

def _gpt2_check(cfg: ModelConfig) -> None:
    hint = " (an rmsnorm/swiglu/rope model without biases fits --layout llama)"
    require(cfg, "gpt2", "decoder", dict(post_norm=False))
    require(cfg, "gpt2", "decoder", dict(norm="layernorm", mlp="gelu", pos="learned",
                                         use_bias=True, tie_embeddings=True), hint)
    require_plain_heads(cfg, "gpt2")


def _gpt2_tensors(cfg: ModelConfig) -> list[Tensor]:
    tensors = [same("embed/embedding", "transformer.wte.weight"),
               same("pos/table/embedding", "transformer.wpe.weight"),
               same("final_norm/scale", "transformer.ln_f.weight"),
               same("final_norm/bias", "transformer.ln_f.bias")]
    for i in range(cfg.n_layers):
        loom, hf = f"layers_{i}/", f"transformer.h.{i}."
        qkv = [f"{loom}attn/{name}" for name in ("query", "key", "value")]
        tensors += [
            same(loom + "attn_norm/scale", hf + "ln_1.weight"),
            same(loom + "attn_norm/bias", hf + "ln_1.bias"),
            columns([p + "/kernel" for p in qkv], hf + "attn.c_attn.weight"),   # (D, 3D)
            columns([p + "/bias" for p in qkv], hf + "attn.c_attn.bias", in_axes=0),
            columns([loom + "attn/out/kernel"], hf + "attn.c_proj.weight", in_axes=2),
            same(loom + "attn/out/bias", hf + "attn.c_proj.bias"),
            same(loom + "mlp_norm/scale", hf + "ln_2.weight"),
            same(loom + "mlp_norm/bias", hf + "ln_2.bias"),
            columns([loom + "mlp/wi/kernel"], hf + "mlp.c_fc.weight"),
            same(loom + "mlp/wi/bias", hf + "mlp.c_fc.bias"),
            columns([loom + "mlp/wo/kernel"], hf + "mlp.c_proj.weight"),
            same(loom + "mlp/wo/bias", hf + "mlp.c_proj.bias"),
        ]
    return tensors


def _gpt2_config(cfg: ModelConfig) -> dict[str, Any]:
    return dict(
        architectures=["GPT2LMHeadModel"], model_type="gpt2", n_positions=cfg.max_len,
        n_embd=cfg.d_model, n_layer=cfg.n_layers, n_head=cfg.n_heads, n_inner=cfg.d_ff,
        activation_function="gelu_new", layer_norm_epsilon=cfg.norm_eps,
        resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=0.0,
        scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False, **_tokens(cfg))


def _gpt2_keys(hf: Mapping[str, Any]) -> dict[str, Any]:
    if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ConversionError(f"config.json has activation_function="
                              f"{hf['activation_function']!r}; Loom's GELU is the tanh "
                              "approximation (gelu_new)")
    unsupported(hf, "scale_attn_by_inverse_layer_idx", False, False)
    unsupported(hf, "scale_attn_weights", True, True)
    unsupported(hf, "tie_word_embeddings", True, True)
    d = hf.get("n_embd", 768)
    return dict(vocab_size=hf["vocab_size"], d_model=d, n_heads=hf.get("n_head", 12),
                n_kv_heads=0, head_dim=0, n_layers=hf.get("n_layer", 12),
                d_ff=hf.get("n_inner") or 4 * d, mlp="gelu", norm="layernorm",
                norm_eps=hf.get("layer_norm_epsilon", 1e-5), pos="learned",
                max_len=hf.get("n_positions", 1024), tie_embeddings=True, use_bias=True)


GPT2 = Layout(name="gpt2", model_type="gpt2", architecture="GPT2LMHeadModel", family="decoder",
              check=_gpt2_check, tensors=_gpt2_tensors, hf_config=_gpt2_config,
              model_keys=_gpt2_keys, objective="clm", prefix="transformer.",
              ignored=r"\.attn\.(masked_)?bias$|^lm_head\.weight$")
