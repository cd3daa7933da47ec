"""Data: the tfds builder's split, the tokenizer, and the causal-LM packing invariants on real
text. (Other objectives: test_data_objectives.py; sources and bad input: test_data_sources.py;
resume: test_data_resume.py; tokenizer CLI: test_tokenizer.py; hosts: test_multiprocess.py.)"""
import json

import numpy as np
import pytest

from data import builder, mixture, pipeline
from data.packing import document_pieces
from data.tokenizer import BOS, EOS, Tokenizer
from errors import DataError


def test_pieces_pair_every_input_with_its_next_token():
    ids = np.arange(10, 47)                     # 37 tokens -> 39 with BOS/EOS
    pieces = document_pieces(ids, seq_len=16, bos=BOS, eos=EOS)
    full = np.concatenate([[BOS], ids, [EOS]])
    seen = []
    for p in pieces:
        assert len(p["inputs"]) == len(p["targets"]) <= 16
        seen.extend(zip(p["inputs"], p["targets"]))
    assert seen == list(zip(full[:-1], full[1:]))  # each transition exactly once, in order


@pytest.fixture
def paragraphs_config(config, tmp_path):
    """A corpus of short real documents (pydoc paragraphs), so rows hold many documents."""
    from pydoc_data.topics import topics
    paragraphs = [p for t in sorted(topics)[:20] for p in topics[t].split("\n\n") if p.strip()]
    (tmp_path / "paragraphs.jsonl").write_text(
        "".join(json.dumps({"text": p}) + "\n" for p in paragraphs))
    config.data.update(source="text_files", paths=(str(tmp_path / "*.jsonl"),),
                       data_dir=str(tmp_path / "tfds"))
    return config


def _batches(config, tokenizer, n=4, **kw):
    it = iter(pipeline.local_batches(config.data, tokenizer, "train", local_batch=8,
                                     shuffle=True, num_epochs=None, **kw))
    return [next(it) for _ in range(n)]


@pytest.mark.parametrize("packing", [True, False])
def test_rows_keep_documents_apart_and_targets_aligned(paragraphs_config, tokenizer_path,
                                                      packing):
    config = paragraphs_config
    config.data.packing = packing
    tokenizer = Tokenizer.load(tokenizer_path)
    for batch in _batches(config, tokenizer):
        seg, pos, w = batch["segment_ids"], batch["positions"], batch["weights"]
        x, y = batch["inputs"], batch["targets"]
        assert x.shape == y.shape == seg.shape == (8, config.data.seq_len)
        np.testing.assert_array_equal(w, (seg != 0).astype(np.float32))
        same = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] != 0)
        # inside a segment: positions count up by one and the next input is this target
        assert np.all(pos[:, 1:][same] == pos[:, :-1][same] + 1)
        assert np.all(x[:, 1:][same] == y[:, :-1][same])
        # a document begins (BOS) only at position 0 of a segment: none is glued to another
        assert np.all(pos[(x == BOS) & (seg != 0)] == 0)
        if packing:
            assert w.mean() > 0.95               # packing leaves (almost) no padding
            assert (seg.max(axis=1) > 1).mean() > 0.5   # most rows hold several documents


def test_split_is_deterministic_and_disjoint(config):
    train = pipeline.documents(config.data, "train")
    valid = pipeline.documents(config.data, "validation")
    assert len(valid) > 0 and len(train) > 5 * len(valid)
    prepared = builder.prepare(mixture.sources(config.data)[0], config.data)
    train_texts = {r["text"] for r in builder.data_source(prepared, "train", "text")}
    valid_texts = {r["text"] for r in builder.data_source(prepared, "validation", "text")}
    assert not train_texts & valid_texts
    assert all(builder.in_validation(t.decode(), 10.0) for t in valid_texts)
    assert not any(builder.in_validation(t.decode(), 10.0) for t in train_texts)
    # the split goes by content: a copy with other whitespace lands on the same side
    text = next(iter(valid_texts)).decode()
    assert builder.in_validation("  " + text.replace(" ", "\t") + "\n", 10.0)


def test_tokenizer_is_byte_exact_on_code_and_unicode(tokenizer_path):
    tokenizer = Tokenizer.load(tokenizer_path)
    for text in ["def f(x):\n    return  x\t+ 1\n\n", "naïve café — 中文 ✓", "  leading"]:
        assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.piece_id("[MASK]") > EOS and tokenizer.piece_id("<extra_id_0>") > EOS


def test_a_file_that_is_not_a_tokenizer_is_refused(tmp_path):
    bad = tmp_path / "vocab.model"
    bad.write_text("not a sentencepiece model")
    with pytest.raises(DataError, match="is not a sentencepiece model"):
        Tokenizer.load(bad)
    with pytest.raises(DataError, match="does not exist"):
        Tokenizer.load(tmp_path / "missing.model")


def test_jsonl_without_the_text_field_names_file_line_and_field(config, tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "fine"}\n{"body": "no text here"}\n')
    config.data.update(source="text_files", paths=(str(tmp_path / "*.jsonl"),),
                       data_dir=str(tmp_path / "tfds"))
    with pytest.raises(DataError, match=r"a.jsonl:2 has no field 'text'.*\['body'\]"):
        pipeline.documents(config.data, "train")
