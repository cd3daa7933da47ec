"""Every objective's rows: the batch layout of train/objectives.py, and the statistics of each
transform measured on real text (pydoc topics): MLM 15% / 80-10-10, whole words, NSP and SOP
pairs, span corruption density, span length, sentinels and exact reconstruction, prefix-LM."""
import dataclasses

import grain
import numpy as np
import pytest

from data import config as data_config, masking, pipeline, sentence_pairs, span_corruption
from data.packing import Doc
from data.tokenizer import CLS, MASK, SEP
from errors import DataError

INT, FLOAT = np.int32, np.float32
MLM_LAYOUT = {"inputs": INT, "targets": INT, "positions": INT, "segment_ids": INT,
              "type_ids": INT, "weights": FLOAT}
ENC_DEC_LAYOUT = {"encoder_inputs": INT, "encoder_positions": INT, "encoder_segment_ids": INT,
                  "decoder_inputs": INT, "decoder_targets": INT, "decoder_positions": INT,
                  "decoder_segment_ids": INT, "decoder_weights": FLOAT}
LAYOUTS = {  # the contract in train/objectives.py
    "clm": {"inputs": INT, "targets": INT, "positions": INT, "segment_ids": INT,
            "weights": FLOAT},
    "mlm": MLM_LAYOUT, "electra": MLM_LAYOUT,
    "span_corruption": ENC_DEC_LAYOUT, "prefix_lm": ENC_DEC_LAYOUT, "denoise": ENC_DEC_LAYOUT,
}


def _docs(texts, epoch=0):
    return [Doc(t, epoch, (0, 0, i)) for i, t in enumerate(texts)]


def _check_segments(seg, pos, real_weights=None):
    same = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] != 0)
    assert np.all(pos[:, 1:][same] == pos[:, :-1][same] + 1)     # positions count up inside
    starts = (seg != 0) & ~np.concatenate([np.zeros_like(seg[:, :1], bool), same], axis=1)
    assert np.all(pos[starts] == 0)                               # and restart at each example
    assert np.all(pos[seg == 0] == 0)
    if real_weights is not None:
        assert np.all(real_weights[seg == 0] == 0)                # padding is never a target


@pytest.mark.parametrize("packing", [True, False])
@pytest.mark.parametrize("objective,pairs", [("clm", "none"), ("mlm", "none"), ("mlm", "nsp"),
                                             ("mlm", "sop"), ("electra", "none"),
                                             ("span_corruption", "none"),
                                             ("prefix_lm", "none"), ("denoise", "none")])
def test_every_objective_yields_its_batch_layout(config, tokenizer, objective, pairs, packing):
    config.data.update(packing=packing)
    config.data.mlm.sentence_pairs = pairs
    batches = iter(pipeline.local_batches(config.data, tokenizer, "train", objective=objective,
                                          local_batch=4, shuffle=True, num_epochs=None))
    batch = next(batches)
    layout = dict(LAYOUTS[objective])
    if pairs != "none":
        layout.update(pair_labels=INT, pair_weights=FLOAT)
    assert set(batch) == set(layout) | {"epoch"}
    t, s = config.data.seq_len, data_config.target_length(config.data, objective)
    for key, dtype in layout.items():
        assert batch[key].dtype == dtype, key
        length = s if key.startswith("decoder_") else t
        assert batch[key].shape == ((4,) if key.startswith("pair_") else (4, length)), key
    if objective in ("span_corruption", "prefix_lm", "denoise"):
        _check_segments(batch["encoder_segment_ids"], batch["encoder_positions"])
        _check_segments(batch["decoder_segment_ids"], batch["decoder_positions"],
                        batch["decoder_weights"])
        # a packed example sits in the same segment on both sides
        for row in range(4):
            assert set(np.unique(batch["encoder_segment_ids"][row])) - {0} == \
                set(np.unique(batch["decoder_segment_ids"][row])) - {0}
    else:
        _check_segments(batch["segment_ids"], batch["positions"], batch["weights"])
    if pairs != "none":
        assert set(np.unique(batch["pair_labels"])) <= {0, 1}
        np.testing.assert_array_equal(batch["pair_weights"], 1.0)
        np.testing.assert_array_equal(batch["segment_ids"].max(axis=1), 1)   # one pair a row


def _mlm_examples(tokenizer, texts, **mlm):
    cfg = masking.MaskConfig.create(**mlm)
    make = masking.MlmExamples(tokenizer, masking.Vocab.of(tokenizer), cfg, seq_len=128)
    return [e for doc in _docs(texts) for e in make(doc)]


def test_mlm_selects_15_percent_then_80_10_10(tokenizer, topics):
    examples = _mlm_examples(tokenizer, topics)
    x = np.concatenate([e["inputs"] for e in examples])
    y = np.concatenate([e["targets"] for e in examples])
    w = np.concatenate([e["weights"] for e in examples]).astype(bool)
    special = tokenizer.special_mask()[y]
    assert special.sum() == 2 * len(examples)            # [CLS] and [SEP] of every example
    assert not (w & special).any()                       # ... which are never selected
    assert w.sum() / (~special).sum() == pytest.approx(0.15, abs=0.003)
    n = w.sum()
    masked, kept = (x[w] == tokenizer.piece_id(MASK)).sum(), (x[w] == y[w]).sum()
    replaced = n - masked - kept
    assert masked / n == pytest.approx(0.8, abs=0.01)
    assert kept / n == pytest.approx(0.1, abs=0.01)
    assert replaced / n == pytest.approx(0.1, abs=0.01)
    assert not tokenizer.special_mask()[x[w & (x != tokenizer.piece_id(MASK))]].any()
    np.testing.assert_array_equal(x[~w], y[~w])          # unselected tokens are untouched
    assert len(set(x[w & (x != y) & (x != tokenizer.piece_id(MASK))])) > 50   # random pieces


def test_whole_word_masking_never_splits_a_word(tokenizer, topics):
    vocab = masking.Vocab.of(tokenizer)
    examples = _mlm_examples(tokenizer, topics[:40], whole_word=True)
    selected_words = multi_piece = 0
    total_selected = total_text = 0
    for e in examples:
        words, w = masking.word_ids(e["targets"], vocab), e["weights"].astype(bool)
        for k in np.unique(words[w]):
            in_word = words == k
            assert w[in_word].all(), tokenizer.decode(e["targets"][in_word])
            selected_words += 1
            multi_piece += in_word.sum() > 1
        total_selected += w.sum()
        total_text += (~vocab.special[e["targets"]]).sum()
    assert multi_piece > 100                    # words of several pieces were chosen whole
    assert total_selected / total_text == pytest.approx(0.15, abs=0.01)
    # and a word really is a word: masking "▁re", "turn" together, not "turn" alone
    ids = tokenizer.encode_array("return value of the function")
    starts = np.diff(masking.word_ids(ids, vocab), prepend=-1) > 0
    assert starts.sum() == 5


def _pair_texts(tokenizer, example):
    ids, types = example["targets"], example["type_ids"]
    a, b = ids[(types == 0)][1:-1], ids[types == 1][:-1]
    assert ids[0] == tokenizer.piece_id(CLS) and ids[len(a) + 1] == tokenizer.piece_id(SEP)
    # a segment trimmed inside a multi-byte character decodes with U+FFFD at its ends
    return tokenizer.decode(a).strip("\ufffd"), tokenizer.decode(b).strip("\ufffd")


@pytest.mark.parametrize("mode", ["nsp", "sop"])
def test_sentence_pairs_are_true_next_or_random_or_swapped(tokenizer, topics, mode):
    docs = [t for t in topics if len(t) > 2000]
    partner = pipeline._Partner(grain.MapDataset.source(docs))
    cfg = masking.MaskConfig.create(sentence_pairs=mode)
    make = masking.MlmExamples(tokenizer, masking.Vocab.of(tokenizer), cfg, 96, partner)
    labels, foreign = [], []
    for doc in _docs(docs):
        for e in make(doc):
            a, b = _pair_texts(tokenizer, e)
            label = int(e["pair_labels"])
            labels.append(label)
            assert a and b
            if mode == "nsp":
                assert a in doc.text
                if label == 1:       # B continues A in the same document
                    assert doc.text.find(b, doc.text.find(a) + len(a)) >= 0
                else:                # B comes from another document (pydoc topics overlap a
                    assert any(b in d for d in docs if d is not doc.text)   # little)
                    foreign.append(b not in doc.text)
            else:
                first, second = (a, b) if label == 1 else (b, a)
                assert doc.text.find(second, doc.text.find(first) + len(first)) >= 0
    assert len(labels) > 400
    assert np.mean(labels) == pytest.approx(0.5, abs=0.07)
    if mode == "nsp":
        assert np.mean(foreign) > 0.9


def test_sentences_cover_the_text_exactly(topics):
    for text in topics[:20]:
        parts = sentence_pairs.sentences(text)
        assert "".join(parts) == text and len(parts) > 3


def _span_examples(tokenizer, texts, seq_len=128, **spans):
    cfg = span_corruption.SpanConfig.create(**spans)
    chunk, target_len = span_corruption.chunk_and_target_lengths(seq_len, cfg)
    sentinels = span_corruption.sentinel_ids(tokenizer, chunk, cfg)
    make = span_corruption.SpanCorruptionExamples(tokenizer, cfg, chunk, sentinels)
    docs = _docs(texts)
    return [(d, e) for d in docs for e in make(d)], chunk, target_len, sentinels


@pytest.mark.parametrize("density,mean,seq_len", [(0.15, 3.0, 128), (0.3, 8.0, 512)])
def test_span_corruption_density_span_length_and_exact_reconstruction(tokenizer, topics,
                                                                      density, mean, seq_len):
    examples, chunk, target_len, sentinels = _span_examples(
        tokenizer, topics[:30], seq_len, noise_density=density, mean_length=mean)
    eos = 3
    noise_tokens = chunk_tokens = n_spans = full_inputs = 0
    rebuilt = {}
    for doc, e in examples:
        x, y = e["encoder_inputs"], e["decoder_targets"]
        assert x[-1] == eos and y[-1] == eos and len(x) <= seq_len and len(y) <= target_len
        x, y = x[:-1], y[:-1]
        in_x, in_y = x[np.isin(x, sentinels)], y[np.isin(y, sentinels)]
        # the same sentinels, in order <extra_id_0>, <extra_id_1>, ... on both sides
        np.testing.assert_array_equal(in_x, sentinels[:len(in_x)])
        np.testing.assert_array_equal(in_y, in_x)
        assert len(in_y) and y[0] == sentinels[0]
        original = span_corruption.reconstruct(x, y, sentinels)
        assert not np.isin(original, sentinels).any()        # no sentinel in the text itself
        rebuilt.setdefault(doc, []).append(original)
        noise_tokens += len(y) - len(in_y)
        chunk_tokens += len(original)
        n_spans += len(in_y)
        full_inputs += len(original) == chunk and len(e["encoder_inputs"]) == seq_len
        np.testing.assert_array_equal(e["decoder_inputs"][1:], e["decoder_targets"][:-1])
    for doc, pieces in rebuilt.items():      # nothing lost, nothing invented, nothing moved
        ids, got = tokenizer.encode_array(doc.text), np.concatenate(pieces)
        assert len(ids) - len(got) in (0, 1)       # (a last chunk of one token is dropped)
        np.testing.assert_array_equal(got, ids[:len(got)])
    assert noise_tokens / chunk_tokens == pytest.approx(density, rel=0.05)
    assert noise_tokens / n_spans == pytest.approx(mean, rel=0.08)
    assert full_inputs > 0.8 * len(examples)      # full chunks fill the encoder exactly


def test_documents_cannot_fake_special_pieces(tokenizer):
    text = "T5 marks spans as <extra_id_0> and BERT uses [MASK], [CLS] and [SEP]. <s></s><pad>"
    ids = tokenizer.encode_array(text)
    assert not tokenizer.special_mask()[ids].any()
    assert tokenizer.decode(ids) == text


def test_prefix_lm_cuts_each_chunk_into_prefix_and_continuation(tokenizer, topics):
    make = span_corruption.PrefixLmExamples(tokenizer, seq_len=64, target_len=32)
    examples = []
    for doc in _docs(topics[:5]):
        ids = tokenizer.encode_array(doc.text)
        pieces = make(doc)
        rebuilt = np.concatenate([np.concatenate([e["encoder_inputs"][:-1],
                                                  e["decoder_targets"][:-1]]) for e in pieces])
        np.testing.assert_array_equal(rebuilt, ids)
        examples += pieces
    cuts = [len(e["encoder_inputs"]) for e in examples]
    assert max(cuts) <= 64 and max(len(e["decoder_targets"]) for e in examples) <= 32
    assert len(set(cuts)) > 20                     # the cut point is random
    assert np.mean([len(e["decoder_targets"]) == 32 for e in examples]) > 0.9


def test_electra_gets_generator_inputs_with_its_own_replacement_split(config, tokenizer):
    config.data.mlm.update(mask_fraction=0.85, random_fraction=0.0)
    rows = iter(pipeline.local_batches(config.data, tokenizer, "train", objective="electra",
                                       local_batch=8, shuffle=False, num_epochs=None))
    x, y, w = [], [], []
    for _ in range(20):
        batch = next(rows)
        x.append(batch["inputs"]), y.append(batch["targets"]), w.append(batch["weights"] > 0)
    x, y, w = np.concatenate(x), np.concatenate(y), np.concatenate(w)
    masked = x[w] == tokenizer.piece_id(MASK)
    assert masked.mean() == pytest.approx(0.85, abs=0.03)
    np.testing.assert_array_equal(x[w][~masked], y[w][~masked])   # the rest kept, none random
    np.testing.assert_array_equal(x[~w], y[~w])


def test_masking_settings_are_checked(config, tokenizer):
    for key, value in [("rate", 0.0), ("mask_fraction", 0.95), ("sentence_pairs", "both")]:
        bad = dataclasses.replace(masking.MaskConfig.create(), **{key: value})
        with pytest.raises(DataError, match=f"data.mlm.{key}"):
            masking.MaskConfig.from_mapping(dataclasses.asdict(bad))
    config.data.update(target_len=4)
    with pytest.raises(DataError, match="data.target_len=4 is too short"):
        pipeline.local_batches(config.data, tokenizer, "train", objective="span_corruption",
                               local_batch=4, shuffle=False, num_epochs=None)
    with pytest.raises(DataError, match="has no data pipeline"):
        pipeline.local_batches(config.data, tokenizer, "train", objective="dpo",
                               local_batch=4, shuffle=False, num_epochs=None)
