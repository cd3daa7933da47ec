"""Where documents come from: cleaning and its counts, bad input, tfds datasets by name and
split (a dataset these tests prepare themselves), and weighted mixtures of sources."""
import json
import logging
from collections import Counter

import numpy as np
import pytest
import tensorflow_datasets as tfds

from data import builder, cleaning, config as data_config, mixture, pipeline
from data.cleaning import CleanConfig
from data.tokenizer import Tokenizer
from errors import DataError


def _paragraphs():
    from pydoc_data.topics import topics
    seen, out = set(), []
    for name in sorted(topics):
        for p in topics[name].split("\n\n"):
            if 40 <= len(p.strip()) <= 2000 and p not in seen:
                seen.add(p)
                out.append(p)
    return out


PARAGRAPHS = _paragraphs()


class LoomTestTopics(tfds.core.GeneratorBasedBuilder):
    """A tfds dataset of pydoc paragraphs in a `content` feature, with a single `train` split:
    it stands in for c4 / lm1b / wiki40b prepared in a user's data_dir."""
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
            {"id": tfds.features.Text(), "content": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for i, text in enumerate(PARAGRAPHS[:400]):
            yield i, {"id": str(i), "content": text}


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("user_tfds")
    LoomTestTopics(data_dir=str(directory), file_format="array_record").download_and_prepare()
    return str(directory)


def test_cleaning_normalises_text():
    clean = CleanConfig.create()
    assert clean.text("Cafe\u0301\r\nline\x00 two\ufeff\rend") == "Caf\u00e9\nline two\nend"
    assert CleanConfig.create(normalize="NFKC").text("\ufb01le \u2460") == "file 1"
    assert CleanConfig.create(normalize="").text("e\u0301") == "e\u0301"
    collapsed = CleanConfig.create(collapse_whitespace=True).text("a  \t b  \n\n\n\nc\u3000d \n")
    assert collapsed == "a b\n\nc d"
    assert clean.text("def f():\n\tif x:\n        return 1\n") == \
        "def f():\n\tif x:\n        return 1\n"                  # code keeps its indentation
    with pytest.raises(DataError, match="data.clean.normalize"):
        CleanConfig.from_mapping(dict(vars(CleanConfig.create())) | {"normalize": "NFX"})


def test_filters_drop_and_count_empty_short_long_and_duplicate_documents():
    good = PARAGRAPHS[:200]
    texts = list(good)
    bad = {"empty": ["", "  \n\t "], "too_short": ["ok", "tiny text"],
           "too_long": ["word " * 1000], "duplicate": [good[3].replace("\n", "\r\n"), good[7]]}
    for i, group in enumerate(bad.values()):
        for j, text in enumerate(group):
            texts.insert(17 * i + 5 * j + 11, text)
    kept = cleaning.filter_documents(texts, CleanConfig.create(min_chars=20, max_chars=2000))
    assert kept.counts == {"documents": len(texts), "kept": len(good),
                           **{reason: len(group) for reason, group in bad.items()}}
    assert [texts[i] for i in kept.indices] == good           # first copies, in order
    report = kept.report("corpus")
    assert "2 empty, 2 too short, 1 too long, 2 duplicate" in report
    nothing = cleaning.filter_documents(texts, CleanConfig.create(min_chars=0, dedup=False))
    assert nothing.counts["kept"] == len(texts)


def _write_corpus(root, *, extra):
    root.mkdir()
    for i, text in enumerate(PARAGRAPHS[:60]):
        (root / f"doc{i:03d}.txt").write_text(text)
    for name, content in extra.items():
        path = root / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return root


def test_bad_files_are_counted_and_reported_never_silent(config, tmp_path, caplog):
    corpus = _write_corpus(tmp_path / "corpus", extra={
        "empty.txt": "", "blank.txt": "   \n\n", "copy.txt": PARAGRAPHS[5].replace("\n", "\r\n"),
        "one_line.txt": "x" * 50_000_000})                    # a 50 MB single line
    config.data.update(source="text_files", paths=(str(corpus),),
                       data_dir=str(tmp_path / "tfds"), validation_percent=20.0)
    config.data.clean.update(max_chars=1_000_000)
    clean = CleanConfig.from_mapping(config.data.clean)
    source = mixture.sources(config.data)[0]
    with caplog.at_level(logging.INFO, logger="data"):
        counts = Counter()
        for split in ("train", "validation"):
            docs, kept = builder.read_split(source, config.data, split, clean)
            assert len(docs) == kept.counts["kept"] > 0
            counts.update(kept.counts)
    assert counts["documents"] == 64 and counts["kept"] == 60
    assert (counts["empty"], counts["too_long"], counts["duplicate"]) == (2, 1, 1)
    logged = " ".join(r.getMessage() for r in caplog.records)
    assert "empty" in logged and "too long" in logged and "duplicate" in logged
    # the pass is cached next to the prepared data and reused
    assert list((tmp_path / "tfds").rglob("loom_clean/*/kept-*.npz"))
    again = builder.read_split(source, config.data, "train", clean)[1]
    assert again.counts == builder.read_split(source, config.data, "train", clean)[1].counts


def test_a_corpus_that_cleaning_empties_is_an_error(config, tmp_path):
    corpus = tmp_path / "empties"
    corpus.mkdir()
    for i in range(40):
        (corpus / f"{i}.txt").write_text(" " * (i % 3) + "\n" * (i % 2))
    config.data.update(source="text_files", paths=(str(corpus),), data_dir=str(tmp_path / "t"))
    with pytest.raises(DataError, match=r"0 of \d+ documents kept \(dropped: \d+ empty\)"):
        pipeline.documents(config.data, "train")
    single = tmp_path / "single"
    single.mkdir()
    (single / "only.txt").write_text(PARAGRAPHS[0])
    config.data.update(paths=(str(single),), data_dir=str(tmp_path / "t2"))
    with pytest.raises(DataError, match="needs more documents"):
        pipeline.documents(config.data, "train")


def test_invalid_utf8_and_missing_paths_name_the_problem(config, tmp_path):
    corpus = _write_corpus(tmp_path / "latin1",
                           extra={"caf\u00e9.txt": "caf\u00e9".encode("latin-1")})
    config.data.update(source="text_files", paths=(str(corpus / "*.txt"),),
                       data_dir=str(tmp_path / "tfds"))
    with pytest.raises(DataError, match=r"caf\u00e9.txt is not valid UTF-8.*re-encode"):
        pipeline.documents(config.data, "train")
    (tmp_path / "bad.jsonl").write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    config.data.update(paths=(str(tmp_path / "bad.jsonl"),), data_dir=str(tmp_path / "tfds2"))
    with pytest.raises(DataError, match=r"bad.jsonl:2 is not valid UTF-8"):
        pipeline.documents(config.data, "train")
    config.data.update(paths=(str(tmp_path / "nowhere" / "*.txt"),))
    with pytest.raises(DataError, match="match no files"):
        pipeline.documents(config.data, "train")


def test_a_prepared_tfds_dataset_is_read_by_name_split_and_field(config, tfds_dir, tokenizer_path):
    config.data.update(source="tfds", tfds_name="loom_test_topics", text_field="content",
                       data_dir=tfds_dir, train_split="train[:90%]", eval_split="train[90%:]")
    train, valid = (pipeline.documents(config.data, s) for s in ("train[:90%]", "train[90%:]"))
    assert len(train) == 360 and len(valid) == 40
    assert not set(train) & set(valid) and set(train) | set(valid) == set(PARAGRAPHS[:400])
    batch = next(iter(pipeline.local_batches(config.data, Tokenizer.load(tokenizer_path),
                                             config.data.train_split, local_batch=4,
                                             shuffle=True, num_epochs=None)))
    assert batch["inputs"].shape == (4, config.data.seq_len) and batch["weights"].sum() > 0
    config.data.text_field = "text"
    with pytest.raises(DataError, match=r"no feature 'text'.*\['content', 'id'\]"):
        pipeline.documents(config.data, "train")
    config.data.update(text_field="content", tfds_name="loom_test_topics_nonexistent")
    with pytest.raises(DataError, match="cannot be loaded"):
        pipeline.documents(config.data, "train")
    config.data.update(tfds_name="loom_test_topics", data_dir=str(tfds_dir) + "_empty")
    with pytest.raises(DataError, match="is not prepared"):
        pipeline.documents(config.data, "train")
    config.data.update(data_dir=tfds_dir, train_split="tain")
    with pytest.raises(DataError, match="split 'tain'"):
        pipeline.documents(config.data, "tain")


def _mixture_config(config, tmp_path, tfds_dir):
    a, b = tmp_path / "a.jsonl", tmp_path / "b"
    a.write_text("".join(json.dumps({"text": p}) + "\n" for p in PARAGRAPHS[400:700]))
    b.mkdir()
    for i, p in enumerate(PARAGRAPHS[700:900]):
        (b / f"{i}.txt").write_text(p)
    config.data.update(data_dir=tfds_dir, validation_percent=10.0, text_field="text",
                       mixture=((f"text_files:{a}", 3.0), (f"text_files:{b}/*.txt", 1.0)))
    return config


def test_mixture_draws_sources_by_weight_deterministically(config, tmp_path, tfds_dir):
    config = _mixture_config(config, tmp_path, tfds_dir)

    def stream(seed):
        config.data.shuffle_seed = seed
        docs, _ = pipeline.document_stream(config.data, "train", shuffle=True, num_epochs=None)
        return [(d.seed[1], d.text) for d in docs[:400]]

    first = stream(0)
    share = np.mean([source == 0 for source, _ in first])
    assert share == pytest.approx(0.75, abs=0.02)
    assert stream(0) == first                                  # same seed, same documents
    assert stream(1) != first
    texts = {t for _, t in first}
    assert texts <= set(PARAGRAPHS[400:900])


def test_mixture_specs_are_checked(config):
    for mix, message in [((("webtext:x", 1.0),), "start it with one of"),
                         ((("tfds:", 1.0),), "needs a dataset name"),
                         ((("python_stdlib", 0.0),), "must be positive"),
                         (("python_stdlib",), "use \\(spec, weight\\)"),
                         ((("python_stdlib", 1.0), ("python_stdlib", 2.0)), "twice")]:
        config.data.mixture = mix
        with pytest.raises(DataError, match=message):
            data_config.check(config.data, "clm")
