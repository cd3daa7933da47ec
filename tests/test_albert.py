"""ALBERT (factorised embeddings, one block shared by every layer) and RoBERTa on Loom's encoder:
the shared block's parameter tree, scan/unrolled/remat agreement, FLOPs, the Hugging Face
albert and roberta layouts against transformers, dynamic masking, and albert_tiny trained on
real text (falling loss with SOP, eval metrics, sharded == one device, exact resume)."""
import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from flax import traverse_util  # noqa: E402

from configs.loader import load  # noqa: E402
from data import pipeline  # noqa: E402
from data.masking import MaskConfig, MlmExamples, Vocab  # noqa: E402
from data.tokenizer import Tokenizer  # noqa: E402
from errors import ConfigError, ModelConfigError  # noqa: E402
from model.config import ModelConfig  # noqa: E402
from test_export import base_config, perturbed, random_params, same_tree  # noqa: E402
from train import families  # noqa: E402
from model.sharding import activate  # noqa: E402
from train import state as state_lib  # noqa: E402
from train.evaluation import evaluate as evaluation  # noqa: E402
from train.hf import convert as export  # noqa: E402
from train.loop import read_metrics, train  # noqa: E402
from train.restore import restore  # noqa: E402
from train.config import validate  # noqa: E402
from train.setup import build  # noqa: E402

ENCODER = dict(family="encoder", vocab_size=512, d_model=32, n_heads=4, n_layers=3, d_ff=64,
               max_len=64, dtype="float32", mlp="gelu", norm="layernorm", norm_eps=1e-12,
               pos="learned", use_bias=True, post_norm=True, type_vocab_size=2)
ALBERT = dict(ENCODER, embed_dim=16, share_layers=True)


def inputs(seed: int = 1, types: int = 2):
    rng = np.random.default_rng(seed)     # ids from 4 up: no [PAD] (RoBERTa positions skip it)
    return rng.integers(4, 512, size=(2, 24)), rng.integers(0, types, size=(2, 24))


def loom_outputs(cfg, params, tokens, types):
    out = families.build(cfg).apply({"params": params}, jnp.asarray(tokens), None, None,
                                     jnp.asarray(types))
    return np.asarray(out["mlm_logits"]), np.asarray(out["pair_logits"])


def n_params(cfg) -> int:
    shapes = jax.eval_shape(lambda: families.build(cfg).init(jax.random.PRNGKey(0),
                                                             *families.init_inputs(cfg)))
    return sum(x.size for x in jax.tree.leaves(shapes))


def test_shared_block_is_one_block_applied_n_times_scanned_or_not_with_remat():
    outputs, trees = [], []
    tokens, types = inputs()
    ref = None
    for scan, remat in ((True, "none"), (True, "full"), (False, "dots")):
        cfg = ModelConfig.create(**ALBERT, scan_layers=scan, remat=remat)
        variables = families.build(cfg).init(jax.random.PRNGKey(0), *families.init_inputs(cfg))
        boxed = traverse_util.flatten_dict(variables["params"], sep="/")
        # one block, no "layers" axis, whether scanned or unrolled
        assert {k.split("/")[1] for k in boxed if k.startswith("encoder/")} == {"layers_shared"}
        assert boxed["encoder/layers_shared/attn/query/kernel"].names == ("embed", "heads",
                                                                          "head_dim")
        assert boxed["embeddings/embed/embedding"].value.shape == (512, 16)   # V x E
        assert boxed["embeddings/proj/kernel"].value.shape == (16, 32)        # E -> D
        assert boxed["mlm_head/transform/kernel"].value.shape == (32, 16)     # D -> E, tied
        params = jax.tree.map(lambda b: b.value, variables["params"],
                              is_leaf=lambda b: hasattr(b, "names"))
        trees.append(jax.tree.structure(params))
        ref = random_params(cfg) if ref is None else ref
        outputs.append(loom_outputs(cfg, ref, tokens, types)[0])
        if remat != "none":   # the remat'd block's gradient flows back through every use
            grads = jax.grad(lambda p: families.build(cfg).apply(
                {"params": p}, jnp.asarray(tokens))["mlm_logits"].std())(ref)
            assert np.abs(grads["encoder"]["layers_shared"]["mlp"]["wi"]["kernel"]).max() > 0
    assert len(set(trees)) == 1
    for out in outputs[1:]:
        np.testing.assert_allclose(out, outputs[0], atol=1e-5)
    # it is exactly an unshared stack whose n blocks all hold the shared block's parameters
    unshared = ModelConfig.create(**dict(ALBERT, share_layers=False, scan_layers=False))
    copied = dict(ref, encoder={f"layers_{i}": ref["encoder"]["layers_shared"] for i in range(3)})
    np.testing.assert_allclose(loom_outputs(unshared, copied, tokens, types)[0], outputs[0],
                               atol=1e-5)
    once = ModelConfig.create(**dict(ALBERT, n_layers=1))   # and not the block applied once
    assert np.abs(loom_outputs(once, ref, tokens, types)[0] - outputs[0]).max() > 0.1

    # the shared stack has one block of parameters but costs n_layers blocks of FLOPs
    shared, unshared = ModelConfig.create(**ALBERT), ModelConfig.create(**dict(ALBERT,
                                                                             share_layers=False))
    n_shared, n_unshared = n_params(shared), n_params(unshared)
    n_block = n_unshared - n_params(ModelConfig.create(**dict(ALBERT, share_layers=False,
                                                              n_layers=2)))
    assert n_unshared - n_shared == 2 * n_block > 0
    assert families.flops_per_token(shared, n_shared, 32) == pytest.approx(
        families.flops_per_token(unshared, n_unshared, 32))

    with pytest.raises(ModelConfigError, match="model.share_layers=True .* encoder family"):
        ModelConfig.create(**dict(ALBERT, family="electra", embed_dim=0))


@pytest.mark.parametrize("share", [True, False])
def test_albert_export_gives_loom_outputs_and_imports_back(share, tokenizer_path, tmp_path):
    cfg = ModelConfig.create(**dict(ALBERT, share_layers=share, scan_layers=share))
    params = random_params(cfg)
    assert export.choose_layout(cfg).name == "albert"
    out = export.write_hf(tmp_path / "hf", params, cfg, Tokenizer.load(tokenizer_path),
                          export.LAYOUTS["albert"])
    hf_model = transformers.AlbertForPreTraining.from_pretrained(out).eval()
    assert hf_model.config.num_hidden_groups == (1 if share else 3)
    tokens, types = inputs()
    with torch.no_grad():
        hf = hf_model.float()(input_ids=torch.tensor(tokens), token_type_ids=torch.tensor(types))
    for ours, theirs in zip(loom_outputs(cfg, params, tokens, types),
                            (hf.prediction_logits.numpy(), hf.sop_logits.numpy()[..., ::-1])):
        print("albert max abs diff", np.abs(ours - theirs).max())
        np.testing.assert_allclose(theirs, ours, rtol=1e-5, atol=2e-5)
        assert ours.std() > 0.1
    export.import_hf(out, tmp_path / "run", albert_run_config(scan_layers=share))
    run = restore(tmp_path / "run", devices=jax.devices()[:1])
    assert run.setup.model_cfg.embed_dim == 16 and run.setup.model_cfg.share_layers == share
    assert same_tree(jax.device_get(run.params), params)


def albert_run_config(**model):
    c = base_config(**model)     # the model's shape comes from config.json
    c.train.objective = "mlm"
    c.eval.sample_prompt = ""
    return c


def test_albert_saved_by_transformers_imports_with_its_outputs(tokenizer_path, tmp_path):
    hf_cfg = transformers.AlbertConfig(vocab_size=512, embedding_size=16, hidden_size=32,
                                       num_hidden_layers=2, num_attention_heads=4,
                                       intermediate_size=48, max_position_embeddings=64)
    hf_model = perturbed(transformers.AlbertForPreTraining(hf_cfg))
    hf_model.save_pretrained(tmp_path / "hf")
    Tokenizer.load(tokenizer_path).save(tmp_path / "hf" / "tokenizer.model")
    export.import_hf(tmp_path / "hf", tmp_path / "run", albert_run_config())
    run = restore(tmp_path / "run", devices=jax.devices()[:1])
    tokens, types = inputs()
    with torch.no_grad():
        hf = hf_model(input_ids=torch.tensor(tokens), token_type_ids=torch.tensor(types))
    for ours, theirs in zip(loom_outputs(run.setup.model_cfg, run.params, tokens, types),
                            (hf.prediction_logits.numpy(), hf.sop_logits.numpy()[..., ::-1])):
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("tied", [True, False])
def test_roberta_export_gives_loom_logits_and_imports_back(tied, tokenizer_path, tmp_path):
    cfg = ModelConfig.create(**dict(ENCODER, type_vocab_size=1, mlp="gelu_exact",
                                    tie_embeddings=tied, scan_layers=tied))
    params = random_params(cfg)
    out = export.write_hf(tmp_path / "hf", params, cfg, Tokenizer.load(tokenizer_path),
                          export.choose_layout(cfg, "roberta"))
    hf_model = transformers.RobertaForMaskedLM.from_pretrained(out).eval()
    # RoBERTa's positions start at padding_idx + 1: Loom's table sits after that many rows
    assert hf_model.config.max_position_embeddings == 64 + 1
    tokens, _ = inputs()
    with torch.no_grad():
        theirs = hf_model.float()(input_ids=torch.tensor(tokens)).logits.numpy()
    ours, _ = loom_outputs(cfg, params, tokens, np.zeros_like(tokens))
    print("roberta max abs diff", np.abs(ours - theirs).max())
    np.testing.assert_allclose(theirs, ours, rtol=1e-5, atol=2e-5)
    assert ours.std() > 0.1

    export.import_hf(out, tmp_path / "run", albert_run_config(scan_layers=tied))
    imported = jax.device_get(restore(tmp_path / "run", devices=jax.devices()[:1]).params)
    # RoBERTa has no sentence-pair head: it comes back as zeros, and (untied) the two output
    # biases come back summed, as for BERT
    assert not any(x.any() for x in jax.tree.leaves(imported["pair_head"]))
    imported["pair_head"] = params["pair_head"]
    if not tied:
        head, original = imported["mlm_head"], params["mlm_head"]
        np.testing.assert_array_equal(head["bias"], original["bias"] + original["out"]["bias"])
        head["bias"], head["out"]["bias"] = original["bias"], original["out"]["bias"]
    assert same_tree(imported, params)


def test_roberta_saved_by_transformers_imports_with_its_logits(tokenizer_path, tmp_path):
    # transformers' own default pad_token_id=1: two unused position rows, not Loom's one
    hf_cfg = transformers.RobertaConfig(vocab_size=512, hidden_size=32, num_hidden_layers=2,
                                        num_attention_heads=4, intermediate_size=48,
                                        max_position_embeddings=66, type_vocab_size=1)
    hf_model = perturbed(transformers.RobertaForMaskedLM(hf_cfg))
    hf_model.save_pretrained(tmp_path / "hf")
    Tokenizer.load(tokenizer_path).save(tmp_path / "hf" / "tokenizer.model")
    export.import_hf(tmp_path / "hf", tmp_path / "run", albert_run_config())
    run = restore(tmp_path / "run", devices=jax.devices()[:1])
    assert run.setup.model_cfg.max_len == 64 and run.setup.model_cfg.mlp == "gelu_exact"
    tokens, _ = inputs()
    with torch.no_grad():
        theirs = hf_model(input_ids=torch.tensor(tokens)).logits.numpy()
    ours, _ = loom_outputs(run.setup.model_cfg, run.params, tokens, np.zeros_like(tokens))
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=2e-5)


def test_encoder_layouts_refuse_what_they_cannot_hold():
    albert = ModelConfig.create(**ALBERT)
    with pytest.raises(ModelConfigError, match="model.embed_dim=16 .* bert layout"):
        export.choose_layout(albert, "bert")
    with pytest.raises(ModelConfigError, match="model.mlp='gelu' .* roberta layout"):
        export.choose_layout(albert, "roberta")    # RoBERTa's MLM head has the exact GELU
    with pytest.raises(ModelConfigError, match="model.embed_dim=16 .* roberta layout"):
        export.choose_layout(ModelConfig.create(**dict(ALBERT, mlp="gelu_exact")), "roberta")
    with pytest.raises(ModelConfigError, match="model.embed_dim=0 .* albert layout"):
        export.choose_layout(ModelConfig.create(**ENCODER), "albert")


def test_masks_are_drawn_anew_each_epoch(config, tokenizer_path):
    """RoBERTa's dynamic masking: a document's masks depend on its place in the stream, which
    differs in each pass, so epoch 2 sees other masks of the same text."""
    docs, _ = pipeline.document_stream(config.data, "train", shuffle=False, num_epochs=2)
    n = len(docs) // 2
    first, second = docs[0], docs[n]
    assert first.text == second.text and (first.epoch, second.epoch) == (0, 1)
    tok = Tokenizer.load(tokenizer_path)
    examples = MlmExamples(tok, Vocab.of(tok), MaskConfig.create(), seq_len=64)
    a, b = examples(first), examples(second)
    assert [len(x["inputs"]) for x in a] == [len(x["inputs"]) for x in b]
    assert all(np.array_equal(x["targets"], y["targets"]) for x, y in zip(a, b))
    assert any(not np.array_equal(x["weights"], y["weights"]) for x, y in zip(a, b))
    assert examples(docs[0])[0]["weights"].tolist() == a[0]["weights"].tolist()  # deterministic


def albert_config(config, steps: int = 12):
    """The test corpus' tiny config as ALBERT: factorised embeddings, one shared block (scanned),
    post-LN, masked LM + sentence-order prediction."""
    config.model.update(family="encoder", pos="learned", mlp="gelu", norm="layernorm",
                        use_bias=True, post_norm=True, n_kv_heads=0, embed_dim=16,
                        share_layers=True, n_layers=3, dropout=0.1)
    config.data.mlm.update(sentence_pairs="sop")
    config.opt.update(lr=6e-3, warmup_steps=2)
    config.train.update(objective="mlm", steps=steps, log_every=1)
    config.eval.update(every=6, steps=2)
    config.ckpt.update(every=6)
    return config


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def train_losses(workdir):
    return {r["step"]: r["loss"] for r in read_metrics(workdir)
            if "split" not in r and "loss" in r}


def test_albert_learns_sop_on_real_text_evaluates_and_resumes_exactly(config, tmp_path):
    config = albert_config(config)
    train(config, tmp_path / "straight", progress=False)
    losses = train_losses(tmp_path / "straight")
    print("albert loss", {s: round(x, 3) for s, x in losses.items()})
    assert np.mean([losses[s] for s in (10, 11, 12)]) < np.mean([losses[s] for s in (1, 2, 3)]) \
        - 0.25, losses
    logged = read_metrics(tmp_path / "straight")
    header = next(r for r in logged if "flops_per_token" in r)
    assert header["flops_per_token"] == pytest.approx(families.flops_per_token(
        ModelConfig.from_mapping(config.model, vocab_size=512), header["params"], 32))
    evals = [r for r in logged if r.get("split") == "eval"]
    assert [r["step"] for r in evals] == [6, 12]
    assert 0 <= evals[-1]["pair_accuracy"] <= 1 and np.isfinite(evals[-1]["loss"])
    # train.eval restores the best checkpoint onto one device and gets the run's numbers
    best = min(evals, key=lambda r: r["loss"])
    evaluation.run(tmp_path / "straight", "best", steps=2, devices=jax.devices()[:1])
    again = read_jsonl(tmp_path / "straight" / "eval.jsonl")[-1]
    assert again["step"] == best["step"] and again["loss"] == pytest.approx(best["loss"],
                                                                             rel=1e-4)
    assert again["pair_accuracy"] == pytest.approx(best["pair_accuracy"])

    # stopped after step 7 and resumed: the same losses to the last bit (dropout RNG included)
    train(config, tmp_path / "resumed", progress=False, stop_after=7)
    assert max(train_losses(tmp_path / "resumed")) == 7
    train(config, tmp_path / "resumed", progress=False)
    assert train_losses(tmp_path / "resumed") == losses


def test_albert_sharded_step_matches_one_device(config):
    config = albert_config(config)
    config.model.update(vocab_size=512, dropout=0.0)
    results = []
    for (data, fsdp, tensor), devices in (((1, 1, 1), jax.devices()[:1]),
                                          ((2, 2, 2), jax.devices())):
        config.mesh.update(data=data, fsdp=fsdp, tensor=tensor)
        setup = build(config, devices)
        with activate(setup.mesh, setup.rules):
            state = state_lib.init(setup.model, setup.model_cfg, setup.tx,
                                   setup.state_shardings, 0)
            step, losses = setup.train_step(), []
            for seed in range(2):
                state, metrics = step(state, families.synthetic_batch(
                    config, setup.batch_sharding, seed))
                losses.append(float(metrics["loss"]))
        results.append((losses, jax.device_get(state.params), state))
    (one, params_one, _), (many, params_many, state_many) = results
    np.testing.assert_allclose(one, many, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5), params_one,
                 params_many)
    # the one shared block is sharded like any block: heads over tensor, d_model over fsdp
    query = state_many.params["encoder"]["layers_shared"]["attn"]["query"]["kernel"]
    assert query.shape == (32, 4, 8) and {s.data.shape for s in query.addressable_shards} == \
        {(16, 2, 8)}


def test_layerwise_fine_tuning_of_one_shared_block_is_refused(config):
    config = albert_config(config)
    config.finetune.layer_lr_decay = 0.8
    with pytest.raises(ConfigError, match="model.share_layers=True has one block"):
        validate(config)
