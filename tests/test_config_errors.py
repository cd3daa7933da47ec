"""A bad value of any config key is a `LoomError` that names the key, raised by `validate` or
`build` before anything is allocated, and every CLI answers it with one line and exit status 2.

The sweep goes over every key of configs/base.py through the override path the CLIs use
(`--config.KEY=VALUE`), with bad values chosen by the key's type; a value either fails that way
or genuinely works (then the config builds).
"""
import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from configs.base import get_config
from configs.loader import apply_overrides, flat_items
from conftest import tiny_config
from data.tokenizer import Tokenizer
from errors import DataError, LoomError
from train.config import validate
from train.setup import build, with_vocab

ROOT = Path(__file__).resolve().parent.parent

# Malformed entries for the tuple keys (mesh.rules, data.paths, data.mixture), as typed on a
# command line: wrong arity, wrong types, unknown names, non-finite or non-positive weights.
BAD_TUPLES = ("bogus", "(1,)", "((1, 2),)", "(('a',),)", "((None, None),)", "(('x', 'y', 'z'),)",
              "((('x',), 1),)", "{'a': 1}", "(('python_stdlib', -1),)", "(('python_stdlib', 0),)",
              "(('python_stdlib', 1e999),)", "(('python_stdlib', True),)", "(('bogus', 1),)",
              "(('text_files:', 1),)", "(('python_stdlib', 1), ('python_stdlib', 2))",
              "(('batch', ('data', 'data')),)", "(('batch', 'nope'),)", "(('', None),)", "('',)")


# Texts no key accepts, whatever its type: they must fail (not parse, or not be finite / 32-bit).
NEVER_WORK = {"maybe", "2", "nan", "inf", "-inf", "1e300", "99999999999999999999", "abc",
              "1.5"}


def bad_values(value) -> list[str]:
    """Command-line texts that are wrong for a key whose current value is `value`, or at least
    suspicious (zero, negative, huge, non-finite, an unknown choice, empty)."""
    if isinstance(value, bool):
        return ["maybe", "", "2", str(not value).lower()]
    if isinstance(value, int):
        return ["-1", "-2", "0", "3", "1000000", "2147483647", "99999999999999999999", "abc",
                "1.5"]
    if isinstance(value, float):
        return ["-1", "0", "nan", "inf", "-inf", "1e300", "abc"]
    if isinstance(value, str):
        return ["bogus", "", " "]
    if isinstance(value, tuple):
        return list(BAD_TUPLES)
    raise AssertionError(f"no bad values for a {type(value).__name__}")


# Configs the sweep starts from: tiny_config with these changes, and the key prefixes swept on
# each. The decoder gets every key; the other families their model keys and the data and eval
# keys their objective reads, also with learned positions (which bound the lengths).
BASES = {
    "decoder": ({}, ("",)),
    "encoder": ({"model.family": "encoder", "train.objective": "mlm"},
                ("model.", "data.mlm.", "data.seq_len")),
    "encoder, learned positions, NSP": (
        {"model.family": "encoder", "train.objective": "mlm", "model.pos": "learned",
         "data.mlm.sentence_pairs": "nsp"},
        ("model.max_len", "model.type_vocab_size", "model.post_norm", "data.seq_len",
         "data.mlm.")),
    "electra": ({"model.family": "electra", "train.objective": "electra"},
                ("model.", "data.mlm.")),
    "encoder_decoder": ({"model.family": "encoder_decoder", "train.objective": "span_corruption"},
                        ("model.", "data.spans.", "data.target_len", "data.seq_len")),
    "encoder_decoder, learned positions, sample": (
        {"model.family": "encoder_decoder", "train.objective": "span_corruption",
         "model.pos": "learned", "eval.sample_prompt": "def "},
        ("model.max_len", "data.seq_len", "data.target_len", "data.spans.", "eval.")),
    "prefix_lm, learned positions": (
        {"model.family": "encoder_decoder", "train.objective": "prefix_lm",
         "model.pos": "learned"},
        ("model.max_len", "model.n_decoder_layers", "data.target_len", "data.seq_len")),
    "denoise, post-LN": (
        {"model.family": "encoder_decoder", "train.objective": "denoise", "model.post_norm": True},
        ("data.noise.", "data.target_len", "model.post_norm", "train.pair_weight",
         "train.discriminator_weight")),
}


def base_config(data_dir: str, tokenizer_path: str, vocab_size: int, changes: dict):
    config = tiny_config(data_dir, tokenizer_path)
    config.model.vocab_size = vocab_size
    for key, value in changes.items():
        group, name = key.rsplit(".", 1)
        node = config
        for part in group.split("."):
            node = node[part]
        node[name] = value
    validate(config)
    return config


class Sweep:
    """Applies one override to a base config and runs what a CLI runs before allocating."""

    def __init__(self, base, tokenizer: Tokenizer):
        self.base, self.tokenizer, self.built = base, tokenizer, set()

    def offence(self, key: str, text: str) -> str | None:
        """None if `--config.KEY=text` fails with a LoomError naming the key, or builds."""
        config = copy.deepcopy(self.base)
        try:
            apply_overrides(config, [f"--config.{key}={text}"])
            validate(config)
            config = with_vocab(config, self.tokenizer)
            self.build(config)
            if text in NEVER_WORK:
                return "accepted"
        except LoomError as e:
            return None if key in str(e) else f"{type(e).__name__} not naming the key: {e}"
        except Exception as e:   # noqa: BLE001 - any other exception is what the test finds
            return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        return None

    def build(self, config) -> None:
        """`build`, once per distinct set of the sections it reads."""
        used = json.dumps([config.model.to_dict(), config.mesh.to_dict(), config.opt.to_dict(),
                           config.train.steps], default=repr, sort_keys=True)
        if used not in self.built:
            build(config)
            self.built.add(used)


def test_every_key_rejects_bad_values_by_name(data_dir, tokenizer_path):
    tokenizer = Tokenizer.load(tokenizer_path)
    offenders = []
    for name, (changes, prefixes) in BASES.items():
        sweep = Sweep(base_config(data_dir, tokenizer_path, tokenizer.vocab_size, changes),
                      tokenizer)
        for key, value in flat_items(get_config()):
            if not key.startswith(prefixes):
                continue
            for text in bad_values(value):
                problem = sweep.offence(key, text)
                if problem:
                    offenders.append(f"[{name}] --config.{key}={text}: {problem}")
    assert not offenders, f"{len(offenders)} bad values escape as other errors, are accepted " \
                          "or fail without naming their key:\n" + "\n".join(offenders)


def test_bad_values_that_need_the_data_fail_as_data_errors(data_dir, tokenizer_path, tmp_path):
    """What validate cannot know without reading data still fails as a DataError, not a
    traceback: a split the corpus lacks, a tokenizer file that is not there."""
    from data import pipeline
    config = tiny_config(data_dir, tokenizer_path)
    for split in ("bogus", " ", "train[:bogus]"):
        config.data.train_split = split
        validate(config)
        with pytest.raises(DataError, match="split"):
            pipeline.documents(config.data, split)
    config.data.tokenizer.path = str(tmp_path / "missing.model")
    validate(config)
    with pytest.raises(DataError, match="data.tokenizer.path"):
        pipeline.load_or_train_tokenizer(config.data, tmp_path / "run")


def run_cli(*args: str) -> tuple[subprocess.CompletedProcess, float]:
    start = time.monotonic()
    out = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True,
                         timeout=120, cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    return out, time.monotonic() - start


def assert_one_line_error(out: subprocess.CompletedProcess, *expected: str) -> None:
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr
    for text in expected:
        assert text in lines[0]


@pytest.mark.parametrize("override, expected", [
    ("model.n_heads=5", ("model.d_model=256", "model.n_heads=5")),
    ("opt.lr=-1", ("opt.lr",)),
    ("data.seq_len=abc", ("data.seq_len", "'abc'")),
    ("mesh.tensor=0", ("mesh.tensor=0",)),
])
def test_train_cli_rejects_a_bad_value_before_any_work(tmp_path, override, expected):
    workdir = tmp_path / "run"
    out, seconds = run_cli("train", "--config", "configs/quickstart.py", "--workdir",
                           str(workdir), f"--config.{override}")
    assert_one_line_error(out, *expected)
    assert not workdir.exists()     # no corpus, tokenizer or checkpoint was made
    assert seconds < 60


def test_benchmark_and_eval_clis_reject_bad_values_in_one_line(tmp_path):
    out, _ = run_cli("train.benchmark", "--config", "configs/bench_tiny.py",
                     "--config.model.d_model=0")
    assert_one_line_error(out, "model.d_model")
    assert not out.stdout.strip()     # nothing was measured
    empty = tmp_path / "no_run"
    empty.mkdir()
    out, _ = run_cli("train.eval", "--workdir", str(empty), "--config.data.seq_len=-1")
    assert_one_line_error(out, "no checkpoints")
    assert not any(empty.iterdir())


def test_a_config_file_setting_a_wrong_type_is_one_line(tmp_path):
    path = tmp_path / "wrong_type.py"
    path.write_text("from configs.base import get_config as base\n\n"
                    "def get_config():\n    c = base()\n    c.model.d_model = 'wide'\n"
                    "    return c\n")
    out, _ = run_cli("train", "--config", str(path), "--workdir", str(tmp_path / "run"))
    assert_one_line_error(out, str(path), "TypeError")
    assert not (tmp_path / "run").exists()
