"""The sentencepiece vocabulary: `python -m data.tokenizer train` on English and Chinese,
character coverage, chunked encoding, and a run that would switch vocabularies failing."""
import glob
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from data import pipeline, tokenizer as tokenizer_lib
from data.tokenizer import Tokenizer
from errors import DataError
from errors import CheckpointError
from train.loop import train
from train.restore import restore

# Chinese prose this machine already has (vim's tutor, gnupg's help), mixed with English.
CHINESE = sorted(glob.glob("/usr/share/vim/vim*/tutor/tutor.zh_cn.utf-8") +
                 glob.glob("/usr/share/gnupg/help.zh_CN.txt"))


def _is_cjk(ch):
    return "\u4e00" <= ch <= "\u9fff"


@pytest.fixture(scope="module")
def bilingual(tmp_path_factory):
    if not CHINESE:
        pytest.skip("no Chinese text on this machine (vim tutor / gnupg help)")
    from pydoc_data.topics import topics
    corpus = tmp_path_factory.mktemp("bilingual")
    for path in CHINESE:
        shutil.copy(path, corpus / (path.replace("/", "_") + ".txt"))
    for name in sorted(topics)[:30]:
        (corpus / f"{name}.txt").write_text(topics[name])
    return corpus


@pytest.mark.parametrize("coverage", [1.0, 0.995])
def test_cli_trains_on_chinese_and_english(bilingual, tmp_path, coverage, capsys):
    out = tmp_path / f"vocab_{coverage}"
    tokenizer_lib.main(["train", "--input", str(bilingual / "*.txt"), "--vocab-size", "1200",
                        "--model-type", "unigram", "--out", str(out),
                        "--character-coverage", str(coverage)])
    assert "fingerprint" in capsys.readouterr().out
    tok = Tokenizer.load(out / "tokenizer.model")
    text = "".join(open(p, encoding="utf-8").read() for p in CHINESE)
    ids = tok.encode_array(text)
    assert tok.decode(ids) == text                           # byte-exact either way
    pieces = [tok._sp.id_to_piece(int(i)) for i in ids]
    byte_pieces = sum(p.startswith("<0x") for p in pieces)
    chars = {c for c in text if _is_cjk(c)}
    whole = {c for c in chars if tok._sp.piece_to_id(c) != tokenizer_lib.UNK}
    if coverage == 1.0:     # every Chinese character of the sample has a piece of its own
        assert whole == chars and byte_pieces == 0
    else:                   # the rarest fall back to UTF-8 bytes
        assert len(whole) < len(chars) and byte_pieces > 0
    english = "Assignment statements are used to (re)bind names to values."
    assert tok.decode(tok.encode_array(english)) == english
    assert len(tok.encode_array(english)) < len(english) / 2    # English has real pieces


def test_cli_trains_bpe_and_refuses_bad_input(tmp_path, capsys):
    from pydoc_data.topics import topics
    (tmp_path / "docs.jsonl").write_text("".join(
        json.dumps({"body": topics[k]}) + "\n" for k in sorted(topics)[:20]))
    tokenizer_lib.main(["train", "--input", str(tmp_path / "docs.jsonl"), "--vocab-size", "600",
                        "--model-type", "bpe", "--out", str(tmp_path), "--text-field", "body"])
    bpe = Tokenizer.load(tmp_path / "tokenizer.model")
    assert bpe.vocab_size == 600 and bpe.piece_id("<extra_id_99>") > 3
    with pytest.raises(SystemExit) as exit_:
        tokenizer_lib.main(["train", "--input", str(tmp_path / "docs.jsonl"), "--vocab-size",
                            "300", "--out", str(tmp_path), "--text-field", "body"])
    assert exit_.value.code == 2 and "too small" in capsys.readouterr().err
    run = subprocess.run([sys.executable, "-m", "data.tokenizer", "train", "--input",
                          str(tmp_path / "nothing" / "*.txt"), "--vocab-size", "600",
                          "--out", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert run.stderr.startswith("error: --input") and "matches no files" in run.stderr
    assert "Traceback" not in run.stderr


def test_long_texts_encode_in_chunks_to_the_same_ids(tokenizer_path, monkeypatch):
    import inspect
    tok = Tokenizer.load(tokenizer_path)
    source = inspect.getsource(json.decoder) * 4
    whole = tok.encode_array(source)
    monkeypatch.setattr(tokenizer_lib, "ENCODE_CHUNK_CHARS", 500)
    chunked = tok.encode_array(source)
    np.testing.assert_array_equal(chunked, whole)                # cut at line breaks: exact
    np.testing.assert_array_equal(whole, tok.encode(source))
    one_line = "spaces but no line break " * 2000               # cut before a space
    assert tok.decode(tok.encode_array(one_line)) == one_line
    assert abs(len(tok.encode_array(one_line)) - len(tok.encode(one_line))) < 10


def _checkpointed_run(config, workdir, tokenizer):
    """A run directory as train() leaves it: its tokenizer and a checkpoint whose config records
    the tokenizer's fingerprint (written by the loop's own with_vocab and Checkpointer)."""
    import jax
    import jax.numpy as jnp
    from train.checkpoint import Checkpointer
    from train.setup import with_vocab
    from train.state import TrainState
    tokenizer.save(workdir / "tokenizer.model")
    resolved = with_vocab(config, tokenizer)
    assert resolved.data.tokenizer.fingerprint == tokenizer.fingerprint
    state = TrainState(step=jnp.array(1), params={"w": jnp.zeros(4)},
                       opt_state={"m": jnp.zeros(4)}, rng=jax.random.PRNGKey(0))
    ckpt = Checkpointer(workdir, {"keep": 1, "keep_best": 0, "async_save": False})
    ckpt.save(1, state, config=resolved.to_dict())
    ckpt.close()


def test_resuming_with_another_vocabulary_fails(config, tmp_path, tokenizer_path):
    _checkpointed_run(config, tmp_path, Tokenizer.load(tokenizer_path))
    # a vocabulary of the same size, trained on other text: only the fingerprint tells
    other = tokenizer_lib.train((t for t in pipeline.documents(config.data, "validation")),
                                vocab_size=512, max_chars=200_000)
    assert other.vocab_size == Tokenizer.load(tokenizer_path).vocab_size
    other.save(tmp_path / "tokenizer.model")
    config.data.tokenizer.path = ""            # resume with the run's (swapped) copy
    with pytest.raises(CheckpointError, match="was trained with tokenizer [0-9a-f]{16}"):
        train(config, tmp_path, progress=False)
    with pytest.raises(DataError, match="was made with tokenizer"):
        restore(tmp_path)
    config.data.tokenizer.path = tokenizer_path    # a configured path that is not the run's
    with pytest.raises(DataError, match="differs from the vocabulary this run was started"):
        train(config, tmp_path, progress=False)
    config.data.tokenizer.fingerprint = "0123456789abcdef"
    with pytest.raises(DataError, match="data.tokenizer.fingerprint was made with tokenizer"):
        train(config, tmp_path / "new", progress=False)
