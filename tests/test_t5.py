"""T5 as published: the relative position buckets are Hugging Face's, transformers'
T5ForConditionalGeneration computes Loom's logits from the exported files and Loom computes
transformers' from a checkpoint it saved (which then trains on), cached decoding with the bias
equals the full forward pass, a sharded step equals one device's, a resumed run repeats an
uninterrupted one, and the v1.1 presets have the published sizes. Nothing is downloaded."""
import copy
import dataclasses
import math
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from configs.loader import load  # noqa: E402
from data.tokenizer import EOS, Tokenizer  # noqa: E402
from model.config import ModelConfig  # noqa: E402
from model.relative import relative_buckets  # noqa: E402
from model.sharding import activate  # noqa: E402
from test_export import perturbed, random_params, same_tree  # noqa: E402
from train import families, state as state_lib  # noqa: E402
from train import __main__ as train_cli  # noqa: E402
from train.decoding.generate import generate  # noqa: E402
from train.hf import convert as export  # noqa: E402
from train.loop import read_metrics, train  # noqa: E402
from train.restore import restore  # noqa: E402
from train.setup import build  # noqa: E402

# T5 v1.1 in miniature: relative bias (few buckets, so short inputs reach the log-spaced and
# the saturated ones), gated-GELU, unscaled logits, untied output
V11 = dict(family="encoder_decoder", vocab_size=512, d_model=32, n_heads=4, n_layers=2,
           n_decoder_layers=2, d_ff=48, max_len=64, dtype="float32", mlp="geglu",
           norm="rmsnorm", pos="relative_bias", rel_buckets=8, rel_max_distance=12,
           qk_scale=False, tie_embeddings=False, scale_decoder_output=False)
# T5 1.0: ReLU, tied embeddings with the d_model^-0.5 output scale, wider heads (d_kv * heads
# != d_model)
V10 = dict(V11, mlp="relu", tie_embeddings=True, scale_decoder_output=True, head_dim=16)
# Published sizes (T5 1.1 release notes / model cards of google/t5-v1_1-base and -large)
PUBLISHED_M = {"t5_base": 247.6, "t5_large": 783.2}
TOLERANCE = dict(rtol=1e-5, atol=1e-5)    # float32 on both sides


@pytest.mark.parametrize("bidirectional", [True, False])
def test_relative_buckets_are_hugging_faces(bidirectional):
    from transformers.models.t5.modeling_t5 import T5Attention
    relative = np.arange(-300, 301)[None, :] + np.arange(0, 3)[:, None]
    for buckets, distance in ((32, 128), (8, 12), (16, 64), (6, 100)):
        theirs = T5Attention._relative_position_bucket(
            torch.tensor(relative), bidirectional=bidirectional, num_buckets=buckets,
            max_distance=distance).numpy()
        ours = jax.jit(relative_buckets, static_argnums=(1, 2, 3))(
            jnp.asarray(relative), bidirectional, buckets, distance)
        np.testing.assert_array_equal(np.asarray(ours), theirs)
        assert theirs.max() == buckets - 1      # the grid reaches the saturated buckets


def inputs(seed: int = 1):
    """Encoder tokens (row 2 padded after 20 tokens, marked in `mask`) and decoder tokens."""
    rng = np.random.default_rng(seed)
    mask = np.ones((2, 28), np.int64)
    mask[1, 20:] = 0
    return rng.integers(4, 512, size=(2, 28)) * mask, mask, rng.integers(4, 512, size=(2, 17))


def loom_logits(cfg, params, enc, mask, dec):
    return np.asarray(families.build(cfg).apply(
        {"params": params}, jnp.asarray(enc), jnp.asarray(dec), None, jnp.asarray(mask)))


def hf_logits(hf_model, enc, mask, dec):
    with torch.no_grad():
        return hf_model.float()(input_ids=torch.tensor(enc), attention_mask=torch.tensor(mask),
                                decoder_input_ids=torch.tensor(dec)).logits.numpy()


def t5_config(config, **model):
    """The test corpus' config (conftest) with a T5 model and span corruption."""
    config.model.update(**{**V11, **model})
    config.train.objective = "span_corruption"
    config.eval.update(sample_prompt="", every=0)
    return config


@pytest.mark.parametrize("shape,scan", [(V11, True), (V10, False)], ids=["v1.1", "1.0"])
def test_exported_t5_gives_loom_logits_and_imports_back(shape, scan, config, tmp_path):
    cfg = ModelConfig.create(**shape, scan_layers=scan)
    params = random_params(cfg)
    assert export.choose_layout(cfg).name == "t5"
    tokenizer = Tokenizer.load(config.data.tokenizer.path)
    out = export.write_hf(tmp_path / "hf", params, cfg, tokenizer, export.LAYOUTS["t5"])
    hf_model = transformers.T5ForConditionalGeneration.from_pretrained(out).eval()
    enc, mask, dec = inputs()
    ours, theirs = loom_logits(cfg, params, enc, mask, dec), hf_logits(hf_model, enc, mask, dec)
    np.testing.assert_allclose(ours, theirs, **TOLERANCE)
    assert ours.std() > 0.03    # (T5 1.0 scales the decoder output by 32^-0.5)
    print(f"t5 {'tied' if cfg.tie_embeddings else 'untied'} export: max |logits diff| "
          f"{np.abs(ours - theirs).max():.2e}")
    if not cfg.tie_embeddings:
        # transformers' cached generation follows Loom's: the bias against every cached key
        with torch.no_grad():
            greedy = hf_model.generate(input_ids=torch.tensor(enc[:1, :20]), max_new_tokens=6,
                                       do_sample=False, eos_token_id=None).numpy()[0, 1:]
        assert generate(cfg, params, [enc[0, :20].tolist()], max_new_tokens=6,
                        stop_ids=())[0] == greedy.tolist()
        hf_tok = transformers.AutoTokenizer.from_pretrained(out)   # the encoder input ends
        text = "def f(x):\n    return x"                         # with EOS, as Loom's rows do
        assert hf_tok(text)["input_ids"] == tokenizer.encode(text) + [EOS]

    export.import_hf(out, tmp_path / "run", t5_config(config, **shape, scan_layers=scan))
    imported = restore(tmp_path / "run", devices=jax.devices()[:1])
    assert same_tree(jax.device_get(imported.params), params)


def test_t5_saved_by_transformers_imports_with_its_logits_and_trains_on(config, tmp_path):
    hf_cfg = transformers.T5Config(
        vocab_size=512, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=1,
        num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=12,
        feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=0.0)
    hf_model = perturbed(transformers.T5ForConditionalGeneration(hf_cfg))
    hf_model.save_pretrained(tmp_path / "hf")
    Tokenizer.load(config.data.tokenizer.path).save(tmp_path / "hf" / "tokenizer.model")
    run_config = export.import_hf(tmp_path / "hf", tmp_path / "run", t5_config(config))
    run = restore(tmp_path / "run", devices=jax.devices()[:1])
    assert run.setup.model_cfg.mlp == "geglu" and run.setup.model_cfg.pos == "relative_bias"
    enc, mask, dec = inputs(2)
    ours = loom_logits(run.setup.model_cfg, run.params, enc, mask, dec)
    theirs = hf_logits(hf_model, enc, mask, dec)
    np.testing.assert_allclose(ours, theirs, **TOLERANCE)
    print(f"t5 import: max |logits diff| {np.abs(ours - theirs).max():.2e}")

    # the written config.py continues training through the CLI on the test corpus
    train_cli.main(["--config", str(run_config), "--workdir", str(tmp_path / "run"),
                    "--no-progress", "--config.train.steps=6", "--config.train.log_every=1",
                    "--config.opt.warmup_steps=1", "--config.ckpt.every=6"])
    losses = [r["loss"] for r in read_metrics(tmp_path / "run")
              if "split" not in r and "loss" in r]
    assert len(losses) == 6 and all(map(math.isfinite, losses))
    assert losses[-1] < losses[0], losses


def test_cached_decoding_with_the_bias_equals_the_full_forward_pass():
    cfg = ModelConfig.create(**V11, scan_layers=True)
    params = random_params(cfg, seed=3)
    sources = [[7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20], [40, 41, 42], [99] * 9]
    cached = generate(cfg, params, sources, max_new_tokens=16, stop_ids=())
    forward = jax.jit(families.build(cfg).apply)
    for source, tokens in zip(sources, cached):    # 16 steps: past rel_max_distance=12
        out = np.full((1, 17), 2, np.int32)
        for i in range(16):
            logits = forward({"params": params}, jnp.array([source]), jnp.asarray(out))
            out[0, i + 1] = int(jnp.argmax(logits[0, i]))
        assert tokens == out[0, 1:].tolist()
    assert len({tuple(t) for t in cached}) > 1


def _steps(config, devices, n=2):
    setup = build(config, devices)
    with activate(setup.mesh, setup.rules):
        state = state_lib.init(setup.model, setup.model_cfg, setup.tx, setup.state_shardings, 0)
        step, losses = setup.train_step(), []
        for seed in range(n):
            state, metrics = step(state, families.synthetic_batch(config, setup.batch_sharding,
                                                                  seed))
            losses.append(float(metrics["loss"]))
    return losses, jax.device_get(state.params)


def test_t5_trains_on_real_text_sharded_as_on_one_device_and_resumes_exactly(config, tmp_path):
    config = t5_config(config, scan_layers=True, dropout=0.1, n_layers=1, n_decoder_layers=1)
    config.train.update(steps=6, log_every=1)
    config.ckpt.update(every=3)
    config.eval.update(steps=1)
    config.mesh.update(data=2, fsdp=2, tensor=2)
    many, params_many = _steps(config, jax.devices())
    one_config = copy.deepcopy(config)
    one_config.mesh.update(data=1, fsdp=1, tensor=1)
    one, params_one = _steps(one_config, jax.devices()[:1])
    np.testing.assert_allclose(many, one, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5), params_one,
                 params_many)

    train(config, tmp_path / "straight", progress=False)
    train(config, tmp_path / "resumed", progress=False, stop_after=3)
    train(config, tmp_path / "resumed", progress=False)

    def losses(workdir):
        return {r["step"]: r["loss"] for r in read_metrics(workdir)
                if "split" not in r and "loss" in r}
    straight, resumed = losses(tmp_path / "straight"), losses(tmp_path / "resumed")
    assert straight == resumed and sorted(straight) == list(range(1, 7))   # exact floats
    assert straight[6] < straight[1] - 0.1, straight      # it learns: 6.21 -> 6.05


@pytest.mark.parametrize("name", sorted(PUBLISHED_M))
def test_v11_presets_have_the_published_size(name):
    config = load(f"configs/{name}.py")
    cfg = ModelConfig.from_mapping(config.model)
    shapes = jax.eval_shape(lambda: families.build(cfg).init(jax.random.PRNGKey(0),
                                                             *families.init_inputs(cfg)))
    n = sum(x.size for x in jax.tree.leaves(shapes)) / 1e6
    assert n == pytest.approx(PUBLISHED_M[name], rel=0.02), n
    assert export.choose_layout(cfg).name == "t5"
    print(f"{name}: {n:.2f}M parameters (published {PUBLISHED_M[name]}M)")


def test_what_t5_cannot_express_is_refused():
    from errors import ModelConfigError
    cfg = ModelConfig.create(**V11)
    with pytest.raises(ModelConfigError, match="model.qk_scale=True has no equivalent"):
        export.choose_layout(dataclasses.replace(cfg, qk_scale=True), "t5")
    with pytest.raises(ModelConfigError, match="scale_decoder_output=True with"):
        export.choose_layout(dataclasses.replace(cfg, scale_decoder_output=True), "t5")
    with pytest.raises(ModelConfigError, match="T5's, for model.family='encoder_decoder'"):
        ModelConfig.create(vocab_size=64, pos="relative_bias")
