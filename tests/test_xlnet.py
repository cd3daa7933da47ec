"""XLNet (train.objective=plm): the permutation masks against an order worked out by hand, the
query stream blind to its own token and to everything after it in the order, segments kept
apart, the rows of real text, sharded == one device, loss falling on real text with an exact
resume and `train.eval`'s metrics, and the xlnet-base preset's published size."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.base import get_config
from configs.loader import load
from data import pipeline, plm
from data.tokenizer import Tokenizer
from errors import ConfigError, DataError
from model.config import ModelConfig
from model.sharding import activate
from model.xlnet import XLNetLM, permutation_masks
from train import eval as eval_cli
from train import families, state as state_lib
from train.config import validate
from train.loop import read_metrics, train
from train.setup import build
from conftest import train_run

# One packed row of 8 tokens: segment 1 at positions 0-4, segment 2 at 5-7, no padding.
SEGMENTS = np.array([[1, 1, 1, 1, 1, 2, 2, 2]], np.int32)
POSITIONS = np.array([[0, 1, 2, 3, 4, 0, 1, 2]], np.int32)
Z = {1: [3, 0, 4, 1, 2], 2: [7, 5, 6]}        # the factorisation orders, by hand
ORDER = np.array([[1, 3, 4, 0, 2, 1, 2, 0]], np.int32)   # rank of each position in its Z
PREDICT = np.array([[2, 1, 6]], np.int32)     # the slots: positions 2, 1 and 6
# What each position's streams see, read off Z: the content stream the tokens up to and
# including it in its segment's order, the query stream those strictly before it.
CONTENT = {0: {3, 0}, 1: {3, 0, 4, 1}, 2: {3, 0, 4, 1, 2}, 3: {3}, 4: {3, 0, 4},
           5: {7, 5}, 6: {7, 5, 6}, 7: {7}}
QUERY = {2: {3, 0, 4, 1}, 1: {3, 0, 4}, 6: {7, 5}}


def visible(mask_row):
    return set(np.flatnonzero(mask_row).tolist())


def test_permutation_masks_match_the_order_worked_out_by_hand():
    for segment, z in Z.items():                      # ORDER is Z's ranks
        assert [int(np.flatnonzero((ORDER[0] == r) & (SEGMENTS[0] == segment))[0])
                for r in range(len(z))] == z
    content, query = permutation_masks(jnp.asarray(ORDER), jnp.asarray(SEGMENTS),
                                       jnp.asarray(PREDICT))
    assert content.shape == (1, 1, 8, 8) and query.shape == (1, 1, 3, 8)
    assert {i: visible(content[0, 0, i]) for i in range(8)} == CONTENT
    assert {int(t): visible(query[0, 0, p]) for p, t in enumerate(PREDICT[0])} == QUERY
    # no order (fine-tuning, init): bidirectional in the segment; the query stream minus itself
    content, query = permutation_masks(None, jnp.asarray(SEGMENTS), jnp.asarray(PREDICT))
    assert visible(content[0, 0, 1]) == {0, 1, 2, 3, 4}
    assert visible(query[0, 0, 2]) == {5, 7}


CFG = ModelConfig.create(family="xlnet", vocab_size=64, d_model=32, n_heads=4, n_kv_heads=2,
                         n_layers=2, d_ff=64, dtype="float32", mlp="gelu", norm="layernorm",
                         use_bias=True, scan_layers=True)


def test_each_stream_depends_exactly_on_the_tokens_before_it_in_the_order():
    """Changing token j changes the query stream's logits at t iff j precedes t in t's order
    (so never t itself, nor a token of another segment), through every layer; the content
    stream of t also sees t."""
    model = XLNetLM(CFG)
    tokens = np.arange(10, 18, dtype=np.int32)[None]
    params = model.init(jax.random.PRNGKey(0), jnp.asarray(tokens))["params"]
    context = (jnp.asarray(POSITIONS), jnp.asarray(SEGMENTS), jnp.asarray(ORDER),
               jnp.asarray(PREDICT))
    logits = jax.jit(lambda t: model.apply({"params": params}, t, *context))
    hidden = jax.jit(lambda t: model.apply({"params": params}, t, *context, hidden=True))
    base_logits, base_hidden = logits(tokens), hidden(tokens)
    for j in range(8):
        changed = tokens.copy()
        changed[0, j] = 40 + j
        moved = np.abs(logits(changed) - base_logits).max(-1)[0] > 1e-5
        assert moved.tolist() == [j in QUERY[int(t)] for t in PREDICT[0]], j
        moved = np.abs(hidden(changed) - base_hidden).max(-1)[0] > 1e-5
        assert moved.tolist() == [j in CONTENT[i] for i in range(8)], j


@pytest.fixture
def plm_config(config):
    config.model.update(family="xlnet", pos="rope", mlp="gelu", norm="layernorm",
                        use_bias=True, scan_layers=False)
    config.train.update(objective="plm")
    config.opt.update(lr=1e-2, warmup_steps=2)
    return config


def test_rows_of_real_text_predict_the_end_of_each_order_and_keep_segments_apart(
        plm_config, tokenizer_path):
    data = plm_config.data
    tokenizer = Tokenizer.load(tokenizer_path)
    batches = pipeline.local_batches(data, tokenizer, "train", objective="plm", local_batch=8,
                                     shuffle=True, num_epochs=None)
    slots = plm.predict_slots(data.seq_len, data.plm.predict_ratio)
    packed, seen = 0, 0
    for batch, again in zip(iter(batches), iter(batches)):   # until rows packed 2+ documents
        if seen >= 4 and packed or seen == 64:
            break
        seen += 1
        for key in batch:                        # the same orders again: a seeded pipeline
            np.testing.assert_array_equal(batch[key], again[key], err_msg=key)
        assert batch["predict_positions"].shape == (8, slots) == batch["weights"].shape
        for b in range(8):
            segments, order = batch["segment_ids"][b], batch["order"][b]
            predicted = set()
            for s in set(segments[segments > 0].tolist()):
                where = np.flatnonzero(segments == s)
                n = len(where)
                assert sorted(order[where].tolist()) == list(range(n))   # a permutation
                last = n - plm.predicted_count(n, data.plm.predict_ratio)
                predicted |= set(where[order[where] >= last].tolist())
            used = batch["weights"][b] > 0
            positions = batch["predict_positions"][b][used]
            assert set(positions.tolist()) == predicted and len(positions) == len(predicted)
            np.testing.assert_array_equal(batch["targets"][b][used],
                                          batch["inputs"][b][positions])
            packed += len(set(segments.tolist()) - {0}) > 1
        content, query = permutation_masks(*(jnp.asarray(batch[k]) for k in (
            "order", "segment_ids", "predict_positions")))
        seg = batch["segment_ids"]
        q_seg = np.take_along_axis(seg, batch["predict_positions"], 1)
        assert not np.any(content[:, 0] & (seg[:, :, None] != seg[:, None, :]))
        assert not np.any(query[:, 0] & (q_seg[:, :, None] != seg[:, None, :]))
        assert not np.any(content[:, 0] & (seg[:, None, :] == 0))
    assert packed > 0, "no row packed two documents: the segment check saw nothing"


def synthetic_config():
    c = get_config()
    c.model.update(family="xlnet", vocab_size=128, d_model=32, n_heads=4, n_kv_heads=2,
                   n_layers=2, d_ff=64, max_len=64, dtype="float32", dropout=0.1)
    c.data.update(seq_len=32, batch_size=16)
    c.opt.update(lr=1e-3, warmup_steps=0, grad_accum=2)
    c.train.update(objective="plm")
    c.eval.update(sample_prompt="")
    validate(c)
    return c


def test_sharded_step_matches_one_device():
    config = synthetic_config()
    config.mesh.update(data=1, fsdp=1, tensor=1)
    one, params_one, initial = train_run(config, jax.devices()[:1], 2)
    config.mesh.update(data=2, fsdp=2, tensor=2)
    many, params_many, _ = train_run(config, jax.devices(), 2, initial)
    for key in one[0]:
        np.testing.assert_allclose([r[key] for r in one], [r[key] for r in many], rtol=2e-5,
                                   atol=1e-6, err_msg=key)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5), params_one,
                 params_many)
    assert one[0]["tokens_per_prediction"] == pytest.approx(32 / 5)


def test_flops_count_what_the_step_computes():
    """The FLOPs hook (MFU) against XLA's count of the compiled train step, unrolled layers:
    both streams, the query stream on the P predicted positions only."""
    from train.perf import hlo
    config = synthetic_config()
    config.model.update(scan_layers=False, dropout=0.0)
    config.opt.grad_accum = 1
    config.mesh.update(data=1, fsdp=1, tensor=1)
    setup = build(config, jax.devices()[:1])
    with activate(setup.mesh, setup.rules):
        state = state_lib.init(setup.model, setup.model_cfg, setup.tx, setup.state_shardings, 0)
        batch = families.synthetic_batch(config, setup.batch_sharding)
        compiled = setup.train_step().lower(state, batch).compile()
    n = state_lib.param_count(state.params)
    model = families.flops_per_token(setup.model_cfg, n, 32, families.decoder_length(config))
    xla = hlo.stats(compiled)["hlo_gflops"] * 1e9 / (16 * 32)
    assert model == pytest.approx(xla, rel=0.06), (model, xla)


def train_losses(workdir):
    return {r["step"]: r["loss"] for r in read_metrics(workdir)
            if "split" not in r and "loss" in r}


def test_trains_on_real_text_resumes_exactly_and_evaluates(plm_config, tmp_path, capsys):
    plm_config.model.dropout = 0.1                 # the RNG stream must resume too
    plm_config.train.update(steps=16, log_every=1)
    plm_config.eval.update(every=16, steps=2)
    plm_config.ckpt.update(every=8)
    train(plm_config, tmp_path / "straight", progress=False)
    losses = train_losses(tmp_path / "straight")
    first, last = np.mean([losses[s] for s in (1, 2, 3)]), np.mean([losses[s] for s in
                                                                    (14, 15, 16)])
    assert last < first - 0.5, losses
    train(plm_config, tmp_path / "resumed", progress=False, stop_after=8)
    assert max(train_losses(tmp_path / "resumed")) == 8
    train(plm_config, tmp_path / "resumed", progress=False)
    assert train_losses(tmp_path / "resumed") == losses     # exact float equality, every step

    eval_cli.main(["--workdir", str(tmp_path / "straight"), "--steps", "2"])
    record = json.loads((tmp_path / "straight" / "eval.jsonl").read_text().splitlines()[-1])
    trained = [r for r in read_metrics(tmp_path / "straight") if r.get("split") == "eval"][-1]
    assert record["loss"] == pytest.approx(trained["loss"], rel=1e-5)
    assert 0 <= record["accuracy"] <= 1
    assert record["perplexity"] == pytest.approx(np.exp(record["loss"]), rel=1e-6)
    # about K = 6 real tokens per predicted one (fewer slots used in short segments)
    assert 6 <= record["tokens_per_prediction"] < 7.5


def test_xlnet_base_has_the_published_size():
    """Yang et al. (2019) give XLNet-Base BERT-Base's shape; the Hugging Face pretrained-model
    table lists xlnet-base-cased as 12-layer, 768-hidden, 12-heads, 110M parameters."""
    config = load("configs/xlnet_base.py")
    validate(config)
    cfg = ModelConfig.from_mapping(config.model)
    shapes = jax.eval_shape(lambda: families.build(cfg).init(jax.random.PRNGKey(0),
                                                             *families.init_inputs(cfg)))
    n = sum(x.size for x in jax.tree.leaves(shapes))
    assert abs(n - 110e6) / 110e6 < 0.02, n


def test_bad_plm_settings_are_one_line_errors():
    config = synthetic_config()
    config.data.plm.predict_ratio = 1.0
    with pytest.raises(DataError, match=r"data.plm.predict_ratio=1.0 must be in \(0, 1\)"):
        validate(config)
    config.data.plm.predict_ratio = 0.1
    config.data.seq_len = 8
    with pytest.raises(DataError, match="data.seq_len=8 x data.plm.predict_ratio=0.1 predicts "
                                        "no token"):
        validate(config)
    config = synthetic_config()
    config.model.family = "decoder"
    with pytest.raises(ConfigError, match="train.objective='plm' trains a model.family='xlnet'"):
        validate(config)
