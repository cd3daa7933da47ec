"""Determinism and resume: an iterator restored from a real Orbax checkpoint yields exactly the
batches an uninterrupted one does, for every objective (and with grain worker processes);
epochs are counted; a finite number of epochs ends the iterator, and a run, cleanly."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from data import pipeline
from train.checkpoint import Checkpointer
from train.loop import read_metrics, train
from train.state import TrainState


@pytest.fixture(scope="module")
def sharding():
    return NamedSharding(Mesh(np.array(jax.devices()), ("data",)), PartitionSpec("data"))


def _batches(config, tokenizer, sharding, objective="clm", split="train"):
    return pipeline.GlobalBatches(
        pipeline.local_batches(config.data, tokenizer, split, objective=objective,
                               local_batch=8, shuffle=True,
                               num_epochs=config.data.num_epochs or None), sharding, 8)


def _take(batches, n):
    return [{k: np.asarray(v) for k, v in next(batches).items()} for _ in range(n)]


def _state():
    return TrainState(step=jnp.array(3), params={"w": jnp.ones(4)},
                      opt_state={"m": jnp.zeros(4)}, rng=jax.random.PRNGKey(0))


def _abstract():
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _state())


def _assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


@pytest.mark.parametrize("objective,pairs", [("clm", "none"), ("mlm", "none"), ("mlm", "nsp"),
                                             ("electra", "none"), ("span_corruption", "none"),
                                             ("prefix_lm", "none"), ("denoise", "none")])
def test_iterator_restored_from_a_checkpoint_continues_exactly(config, tokenizer, sharding,
                                                               tmp_path, objective, pairs):
    config.data.mlm.sentence_pairs = pairs
    config.data.update(interleave=4, shuffle_window=16)
    straight = _take(_batches(config, tokenizer, sharding, objective), 6)

    interrupted = _batches(config, tokenizer, sharding, objective)
    _assert_same(_take(interrupted, 3), straight[:3])
    ckpt = Checkpointer(tmp_path, {"keep": 1, "keep_best": 0, "async_save": False})
    ckpt.save(3, _state(), config={}, data_iterator=interrupted)
    ckpt.close()

    resumed = _batches(config, tokenizer, sharding, objective)
    Checkpointer(tmp_path, {"keep": 1, "keep_best": 0, "async_save": False}).restore_state(
        3, _abstract(), data_iterator=resumed)
    _assert_same(_take(resumed, 3), straight[3:])
    # the state is plain JSON (what grain's orbax handler writes for this iterator)
    state = json.loads(resumed.get_state())
    assert isinstance(state, dict)


def test_seed_changes_the_order_and_only_the_seed(config, tokenizer, sharding):
    first = _take(_batches(config, tokenizer, sharding), 2)
    _assert_same(_take(_batches(config, tokenizer, sharding), 2), first)
    config.data.shuffle_seed = 1
    other = _take(_batches(config, tokenizer, sharding), 2)
    assert not np.array_equal(other[0]["inputs"], first[0]["inputs"])


def test_grain_workers_are_deterministic_and_resumable(config, tokenizer, sharding):
    config.data.update(worker_count=2, interleave=4, shuffle_window=16)
    running = _batches(config, tokenizer, sharding)
    first = _take(running, 2)
    state = running.get_state()
    then = _take(running, 2)
    resumed = _batches(config, tokenizer, sharding)        # new worker processes
    resumed.set_state(state)
    _assert_same(_take(resumed, 2), then)
    assert not np.array_equal(first[0]["inputs"], then[0]["inputs"])


@pytest.fixture
def small_corpus(config, tmp_path):
    """About 30 short real documents: an epoch is a few batches."""
    from pydoc_data.topics import topics
    docs = [p for t in sorted(topics)[:6] for p in topics[t].split("\n\n") if len(p) > 80][:30]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    config.data.update(source="text_files", paths=(str(tmp_path / "docs.jsonl"),),
                       data_dir=str(tmp_path / "tfds"), validation_percent=10.0,
                       shuffle_window=8, interleave=4)
    return config


def _tokens(batches):
    return sum(float(np.asarray(b["weights"]).sum()) for b in batches)


def test_epochs_are_counted_and_a_finite_run_of_data_ends_cleanly(small_corpus, tokenizer,
                                                                  sharding):
    config = small_corpus
    config.data.num_epochs = 1
    one = _batches(config, tokenizer, sharding)
    one_epoch = list(one)
    assert {one.epoch} == {0} and len(one_epoch) >= 3
    config.data.num_epochs = 2
    two = _batches(config, tokenizer, sharding)
    epochs = []
    for batch in two:
        epochs.append(two.epoch)
    assert epochs[0] == 0 and epochs[-1] == 1 and sorted(epochs) == epochs
    # both passes deliver all the tokens (less the remainder of a partial last batch)
    assert _tokens(_take_all(config, tokenizer, sharding)) == pytest.approx(
        2 * _tokens(one_epoch), abs=8 * config.data.seq_len)
    with pytest.raises(StopIteration):
        next(two)                                   # ended, and stays ended
    config.data.num_epochs = 0                      # repeat: passes keep coming, counted
    forever = _batches(config, tokenizer, sharding)
    for _ in range(4 * len(one_epoch)):
        next(forever)
    assert forever.epoch >= 3


def _take_all(config, tokenizer, sharding):
    return [{k: np.asarray(v) for k, v in b.items()}
            for b in _batches(config, tokenizer, sharding)]


def test_a_run_stops_cleanly_when_its_epochs_end(small_corpus, tmp_path, capsys):
    config = small_corpus
    config.data.num_epochs = 1
    config.train.update(steps=1000, log_every=1)
    config.eval.update(every=0, steps=1)
    config.ckpt.update(every=0)
    train(config, tmp_path / "run", progress=False)
    steps = [r["step"] for r in read_metrics(tmp_path / "run") if "loss" in r and "split" not in r]
    last = max(steps)
    assert 3 <= last < 1000
    assert "ended after step" in capsys.readouterr().out
    assert all(r["epoch"] == 0 for r in read_metrics(tmp_path / "run") if "epoch" in r)
    ckpt = Checkpointer(tmp_path / "run", read_only=True)
    assert ckpt.latest_step() == last                # the end is checkpointed
    train(config, tmp_path / "run", progress=False)  # and a restart ends at once, cleanly
    again = [r["step"] for r in read_metrics(tmp_path / "run") if "loss" in r
             and "split" not in r]
    assert max(again) == last
