"""Commands on a trained run: `python -m train.eval` (loss on 1 and 8 devices, bits per byte,
multiple-choice scoring, errors) and `python -m train.generate`."""
import json
import math
import os
import random
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config
from data import builder, pipeline
from data.tokenizer import BOS, EOS
from errors import ConfigError, DataError
from model.sharding import activate
from train import eval as eval_cli
from train import generate as generate_cli
from train.decoding.generate import generate_text
from train.decoding.options import Options
from train.evaluation import choices
from train.loop import read_metrics, train
from train.restore import restore


@pytest.fixture(scope="module")
def run_dir(data_dir, tokenizer_path, tmp_path_factory):
    """8 steps on 8 devices, evaluated and checkpointed at steps 4 and 8."""
    workdir = tmp_path_factory.mktemp("run")
    config = tiny_config(data_dir, tokenizer_path)
    train(config, workdir, progress=False)
    return workdir


@pytest.fixture(scope="module")
def on_one_device(run_dir):
    """The latest checkpoint restored onto one device, for independent computations."""
    return restore(run_dir, "latest", devices=jax.devices()[:1])


def eval_records(workdir):
    return [json.loads(line) for line in (workdir / "eval.jsonl").read_text().splitlines()]


def log_likelihood(restored, ids):
    """Summed log p(ids[1:] | ids[:-1]) by one full forward pass (right padding to max_len,
    which a causal model does not see, keeps it one compilation)."""
    n, width = len(ids) - 1, restored.setup.model_cfg.max_len
    forward = _forwards.setdefault(id(restored), jax.jit(
        lambda x: restored.setup.model.apply({"params": restored.params}, x)))
    logits = forward(jnp.array([ids[:-1] + [0] * (width - n)]))[0, :n]
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
    return float(jnp.sum(jnp.take_along_axis(logp, jnp.array(ids[1:])[:, None], -1)))


_forwards = {}


def test_eval_on_one_and_eight_devices_matches_the_training_eval(run_dir):
    trained = {r["step"]: r["loss"] for r in read_metrics(run_dir) if r.get("split") == "eval"}
    best = min(trained, key=trained.get)
    eval_cli.main(["--workdir", str(run_dir), "--step", "best"])            # 8 devices
    record = eval_records(run_dir)[-1]
    assert record["step"] == best and record["split"] == "eval/python_stdlib/validation"
    assert record["loss"] == pytest.approx(trained[best], rel=1e-5)
    assert record["perplexity"] == pytest.approx(math.exp(record["loss"]), rel=1e-6)
    assert record["bits_per_byte"] == pytest.approx(
        record["loss"] * record["tokens"] / math.log(2) / record["bytes"], rel=1e-6)
    events = b"".join(p.read_bytes() for p in (run_dir / "tensorboard").glob("events.*"))
    assert b"eval/python_stdlib/validation/bits_per_byte" in events

    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1",
               JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-m", "train.eval", "--workdir", str(run_dir),
                          "--step", "4"], capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    record = eval_records(run_dir)[-1]
    assert record["step"] == 4 and record["loss"] == pytest.approx(trained[4], rel=1e-5)
    assert "eval/python_stdlib/validation/step 4" in out.stdout


def _corpus(tmp_path, n_train=8):
    """Text files (non-ASCII, byte-fallback characters, runs of spaces, tabs) of which exactly
    `n_train` fall in the train split."""
    folder = tmp_path / "docs"
    folder.mkdir()
    train_texts, n_validation, i = [], 0, 0
    while len(train_texts) < n_train or not n_validation:
        text = (f"  doc {i}: héllo wörld ☃ 中文\n\tx = {i * 7}  # done" + "!" * (i % 3))
        path = folder / f"doc{i}.txt"
        path.write_text(text, encoding="utf-8")
        if builder.in_validation(text, 10.0):
            n_validation += 1
        elif len(train_texts) < n_train:
            train_texts.append(text)
        else:
            path.unlink()
        i += 1
    return folder, train_texts


def test_bits_per_byte_counts_the_bytes_of_the_text(run_dir, on_one_device, tmp_path):
    folder, texts = _corpus(tmp_path)
    eval_cli.main(["--workdir", str(run_dir), "--split", "train", "--steps", "0",
                   "--config.data.source=text_files", f"--config.data.paths={folder}/*.txt",
                   "--config.data.packing=false", "--config.data.seq_len=64"])
    record = eval_records(run_dir)[-1]
    assert record["split"] == "eval/text_files/train" and record["batches"] is None
    assert record["bytes"] == sum(len(t.encode("utf-8")) for t in texts)
    tokenizer = on_one_device.tokenizer
    docs = [[BOS] + tokenizer.encode(t) + [EOS] for t in texts]
    assert record["tokens"] == sum(len(d) - 1 for d in docs)      # every document, once
    loss_sum = -sum(log_likelihood(on_one_device, d) for d in docs)
    assert record["loss"] * record["tokens"] == pytest.approx(loss_sum, rel=1e-4)
    assert record["bits_per_byte"] == pytest.approx(
        loss_sum / math.log(2) / record["bytes"], rel=1e-4)


def _choice_items(documents, n=6):
    """Contexts from the training text; the label continues it, the others are its characters
    shuffled (same bytes) and its first half (fewer bytes, so normalisation matters). Also the
    index of the shuffled continuation of each item."""
    rnd, items, shuffled = random.Random(0), [], []
    for text in documents:
        words = text.split(" ")   # 8 plain words after 10 others, the last 2 of them plain
        start = next((i for i in range(10, len(words) - 8)
                      if all(w.isalpha() for w in words[i - 2:i + 8])), None)
        if start is None:
            continue
        context, truth = " ".join(words[start - 10:start]), " " + " ".join(words[start:start + 8])
        chars = list(truth[1:])
        rnd.shuffle(chars)
        options = [truth, " " + "".join(chars), truth[:len(truth) // 2]]
        order = rnd.sample(range(3), 3)
        items.append({"context": context, "continuations": [options[k] for k in order],
                      "label": order.index(0)})
        shuffled.append(order.index(1))
        if len(items) == n:
            break
    items.append({"context": items[0]["context"],
                  "continuation": items[0]["continuations"][items[0]["label"]]})
    return items, shuffled


def check_accuracies(record, loglik, tokens, n_bytes, labels):
    """The record's three accuracies from per-item log-likelihoods, token and byte counts;
    returns the indices of the labelled items."""
    labelled = [i for i, label in enumerate(labels) if label is not None]

    def accuracy(norm):
        return np.mean([np.argmax(loglik[i] / norm[i]) == labels[i] for i in labelled])

    assert record["accuracy"] == pytest.approx(accuracy([1] * len(labels)))
    assert record["accuracy_per_token"] == pytest.approx(accuracy(tokens))
    assert record["accuracy_per_byte"] == pytest.approx(accuracy(n_bytes))
    return labelled


def test_multiple_choice_scoring_matches_full_forward_passes(run_dir, on_one_device, tmp_path):
    config = on_one_device.config
    texts = list(pipeline.documents(config.data, "train"))
    items, shuffled = _choice_items(texts)
    path = tmp_path / "task.jsonl"
    path.write_text("\n".join(json.dumps(item) for item in items) + "\n\n", encoding="utf-8")
    eval_cli.main(["--workdir", str(run_dir), "--choices", str(path)])          # 8 devices
    record = eval_records(run_dir)[-1]
    assert record["split"] == "choices/task" and record["items"] == len(items)

    tokenizer = on_one_device.tokenizer
    loglik, tokens, n_bytes, labels = [], [], [], []
    for item in items:
        ctx = [BOS] + tokenizer.encode(item["context"])
        row = []
        for cont in item.get("continuations", [item.get("continuation")]):
            whole = [BOS] + tokenizer.encode(item["context"] + cont)
            assert whole[:len(ctx)] == ctx                    # the seam falls between pieces
            row.append((log_likelihood(on_one_device, whole) - log_likelihood(on_one_device, ctx),
                        len(whole) - len(ctx), len(cont.encode("utf-8"))))
        loglik.append(np.array([r[0] for r in row]))
        tokens.append(np.array([r[1] for r in row]))
        n_bytes.append(np.array([r[2] for r in row]))
        labels.append(item.get("label"))
    labelled = check_accuracies(record, loglik, tokens, n_bytes, labels)
    chosen = [ll[label or 0] for ll, label in zip(loglik, labels)]
    assert record["loglik"] == pytest.approx(np.mean(chosen), rel=1e-4)
    # the trained text beats its own characters shuffled (same bytes, rarer pieces)
    assert all(loglik[i][labels[i]] > loglik[i][shuffled[i]] for i in labelled)


def _trained(config, workdir, family, objective, steps):
    """`config` turned into a `family` model trained `steps` steps on `objective`, evaluated and
    checkpointed only at the end."""
    config.model.update(family=family, pos="learned", n_decoder_layers=1)
    config.train.update(objective=objective, steps=steps)
    config.eval.update(every=0, steps=1)
    config.ckpt.update(every=0)
    train(config, workdir, progress=False)
    return workdir


@pytest.fixture(scope="module")
def seq2seq_run(data_dir, tokenizer_path, tmp_path_factory):
    """An encoder-decoder (learned positions, so contexts must be cut) trained 2 steps as a
    prefix LM on 8 devices, and its checkpoint restored onto one device."""
    workdir = _trained(tiny_config(data_dir, tokenizer_path), tmp_path_factory.mktemp("s2s"),
                       "encoder_decoder", "prefix_lm", steps=2)
    return workdir, restore(workdir, "latest", devices=jax.devices()[:1])


def seq2seq_scores(restored, encoder_ids, continuation_ids):
    """log p(continuation | encoder input) and whether greedy decoding writes the continuation,
    by one full forward pass from [BOS] (the decoder's right padding to max_len, which a causal
    decoder does not see, keeps the decoder one shape; the encoder has no padding)."""
    n, width = len(continuation_ids), restored.setup.model_cfg.max_len
    forward = _forwards.setdefault(("s2s", id(restored)), jax.jit(
        lambda e, d: restored.setup.model.apply({"params": restored.params}, e, d)))
    decoder_inputs = [BOS] + continuation_ids[:-1] + [0] * (width - n)
    logits = forward(jnp.array([encoder_ids]), jnp.array([decoder_inputs]))[0, :n]
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
    targets = jnp.array(continuation_ids)
    return (float(jnp.sum(jnp.take_along_axis(logp, targets[:, None], -1))),
            bool(jnp.all(jnp.argmax(logits, -1) == targets)))


def test_encoder_decoder_scoring_matches_full_forward_passes(seq2seq_run, tmp_path):
    workdir, restored = seq2seq_run
    tokenizer, max_len = restored.tokenizer, restored.setup.model_cfg.max_len
    texts = list(pipeline.documents(restored.config.data, "train"))
    items, _ = _choice_items(texts, n=4)
    long_context = texts[0][:3000]                     # far more than max_len tokens
    assert len(tokenizer.encode(long_context)) > 2 * max_len
    items.append({"context": long_context, "continuations": [" import os", " x = 1"],
                  "label": 1})
    path = tmp_path / "task.jsonl"
    path.write_text("\n".join(json.dumps(item) for item in items) + "\n", encoding="utf-8")
    eval_cli.main(["--workdir", str(workdir), "--choices", str(path)])          # 8 devices
    record = eval_records(workdir)[-1]
    assert record["split"] == "choices/task" and record["items"] == len(items)

    # the context + [EOS] in the encoder, its last max_len tokens; the continuation on its own
    loglik, greedy, tokens, n_bytes, labels = [], [], [], [], []
    for item in items:
        encoder_ids = (tokenizer.encode(item["context"]) + [EOS])[-max_len:]
        conts = item.get("continuations", [item.get("continuation")])
        rows = [seq2seq_scores(restored, encoder_ids, tokenizer.encode(c)) for c in conts]
        loglik.append(np.array([r[0] for r in rows]))
        greedy.append([r[1] for r in rows])
        tokens.append(np.array([len(tokenizer.encode(c)) for c in conts]))
        n_bytes.append(np.array([len(c.encode("utf-8")) for c in conts]))
        labels.append(item.get("label"))
    with activate(restored.setup.mesh, restored.setup.rules):
        scores = choices.score_items(restored, choices.read_items(path))    # one device
    for s, ll, t, b in zip(scores, loglik, tokens, n_bytes):
        np.testing.assert_allclose(s.loglik, ll, rtol=1e-4)
        np.testing.assert_array_equal(s.tokens, t)
        np.testing.assert_array_equal(s.bytes, b)
    check_accuracies(record, loglik, tokens, n_bytes, labels)
    chosen = [label or 0 for label in labels]
    chosen_ll = [ll[c] for ll, c in zip(loglik, chosen)]
    assert record["loglik"] == pytest.approx(np.mean(chosen_ll), rel=1e-4)
    assert record["bits_per_byte"] == pytest.approx(
        -sum(chosen_ll) / math.log(2) / sum(int(b[c]) for b, c in zip(n_bytes, chosen)),
        rel=1e-4)
    assert record["greedy_match"] == pytest.approx(
        np.mean([g[c] for g, c in zip(greedy, chosen)]))


def test_encoder_decoder_scores_do_not_depend_on_the_batch(seq2seq_run):
    _, restored = seq2seq_run
    texts = list(pipeline.documents(restored.config.data, "train"))
    items = [choices.Item(t[:20], (" a", " import os, sys"), 0, f"item {i}")
             for i, t in enumerate(texts[:3])]
    long = choices.Item(texts[3][:3000], (" return x" * 12,), None, "long")
    with activate(restored.setup.mesh, restored.setup.rules):
        alone = [choices.score_items(restored, [item])[0] for item in items]
        # with a long context and long continuation: wider encoder and decoder padding
        together = choices.score_items(restored, [items[0], long, items[1], items[2]])
    for a, t in zip(alone, [together[0]] + together[2:]):
        np.testing.assert_allclose(a.loglik, t.loglik, rtol=1e-5)
        np.testing.assert_array_equal(a.greedy, t.greedy)


class _CharTokenizer:
    """One id per character, with a dummy prefix: enough to pin down the row layout."""
    adds_dummy_prefix = True

    def encode(self, text):
        return [ord(c) for c in " " + text]


def test_seq2seq_rows_cut_the_context_and_keep_the_continuation_whole():
    row = choices.to_seq2seq_row(_CharTokenizer(), "abcdef", " xy", 4, "here")
    # the dummy prefix stands for the continuation's leading space: " xy", not "  xy"
    assert row.tokens == (BOS, ord(" "), ord("x"), ord("y")) and row.scored == 3
    assert row.encoder == (ord("d"), ord("e"), ord("f"), EOS)   # the last max_len, EOS kept
    with pytest.raises(DataError, match="here: a continuation of 5 tokens does not fit"):
        choices.to_seq2seq_row(_CharTokenizer(), "a", "wxyz", 4, "here")


def test_only_families_that_write_text_are_scored():
    assert choices.prompting("decoder") == "continue"
    assert choices.prompting("encoder_decoder") == "encode"
    for family in ("encoder", "electra"):
        with pytest.raises(ConfigError, match=f"model.family='{family}' writes no text"):
            choices.prompting(family)


def test_choices_on_an_encoder_run_are_one_error_line(data_dir, tokenizer_path, tmp_path,
                                                       capsys):
    workdir = _trained(tiny_config(data_dir, tokenizer_path), tmp_path / "run", "encoder",
                       "mlm", steps=1)
    path = tmp_path / "task.jsonl"
    path.write_text('{"context": "a", "continuation": " b"}\n')
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        eval_cli.main(["--workdir", str(workdir), "--choices", str(path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --choices scores the continuations")
    assert "model.family='encoder' writes no text" in err[0] and "without --choices" in err[0]


@pytest.mark.parametrize("args,message", [
    (["--workdir", "{missing}"], "error: no checkpoints in"),
    (["--workdir", "{run}", "--step", "7"], "error: no checkpoint at step 7"),
    (["--workdir", "{run}", "--step", "first"], "error: --step 'first': use latest, best"),
    (["--workdir", "{run}", "--choices", "{bad}"], ":2 is not valid JSON"),
    (["--workdir", "{run}", "--config.model.d_model=64"], "cannot be changed when restoring"),
    (["--workdir", "{run}", "--config.data.seq_lenn=8"], "did you mean data.seq_len?"),
])
def test_eval_errors_are_one_line_and_exit_2(run_dir, tmp_path, capsys, args, message):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"context": "a", "continuation": " b"}\n{"context": \n')
    args = [a.format(run=run_dir, missing=tmp_path / "none", bad=bad) for a in args]
    with pytest.raises(SystemExit) as exit_info:
        eval_cli.main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]


def test_generate_cli_matches_the_python_api(run_dir, on_one_device, capsys):
    prompts = ["def ", "import"]
    generate_cli.main(["--workdir", str(run_dir), "--prompt", prompts[0], "--prompt", prompts[1],
                       "--strategy", "beam", "--beam-width", "2", "--max-new-tokens", "6",
                       "--stop", "\\n"])                                        # 8 devices
    printed = capsys.readouterr().out.splitlines()
    options = Options("beam", beam_width=2)
    stop = on_one_device.tokenizer.piece_id("\n")
    texts = generate_text(on_one_device.setup.model_cfg, on_one_device.params,
                                       on_one_device.tokenizer, prompts, max_new_tokens=6,
                                       options=options, stop_ids=(EOS, stop))
    assert printed == [prompts[0] + texts[0], "-" * 40, prompts[1] + texts[1], "-" * 40]
    assert all(text and "\n" not in text for text in texts)
    for args, message in [(["--strategy", "sample", "--temperature", "0"], "temperature > 0"),
                          (["--stop", "no such piece"], "is not a piece of the vocabulary")]:
        with pytest.raises(SystemExit):
            generate_cli.main(["--workdir", str(run_dir), "--prompt", "x"] + args)
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0]
