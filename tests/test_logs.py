"""What a user sees on the console: a real `python -m train` in a subprocess, its output piped as
it would be to a log file, and the logging set-up every CLI shares (configs.loader)."""
import os
import re
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import jax

from conftest import CORPUS_DOCS
from data.builder import LocalCorpus

ROOT = Path(__file__).resolve().parents[1]
METRIC_LINE = re.compile(r"\[(train|eval)/step \d+\]( [\w/]+=\S+)+")


def _env() -> dict[str, str]:
    """This session's XLA_FLAGS (8 CPU devices) and compilation cache, on CPU."""
    return {**os.environ, "JAX_PLATFORMS": "cpu",
            "JAX_COMPILATION_CACHE_DIR": jax.config.jax_compilation_cache_dir,
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}


def test_a_piped_training_prints_each_progress_line_once_and_whole_metric_lines(
        tokenizer_path, tmp_path):
    # A directory of its own, so the run prepares (and cleans) the corpus itself: the session's
    # data_dir was prepared, and its cleaning cached, by the tokenizer fixture.
    data_dir = tmp_path / "tfds"
    overrides = {
        "model.d_model": 32, "model.n_heads": 4, "model.n_kv_heads": 2, "model.n_layers": 1,
        "model.d_ff": 64, "model.max_len": 64, "data.source": "python_stdlib",
        "data.max_docs": CORPUS_DOCS, "data.validation_percent": 10.0, "data.data_dir": data_dir,
        "data.seq_len": 32, "data.batch_size": 8, "data.tokenizer.path": tokenizer_path,
        "train.steps": 4, "train.log_every": 2, "eval.every": 2, "eval.steps": 1,
        "eval.sample_tokens": 4, "ckpt.every": 4, "ckpt.async_save": False,
        # 2 KV heads on tensor=4: the model's sharding says which kernels it replicates
        "mesh.data": 2, "mesh.fsdp": 1, "mesh.tensor": 4}
    run = subprocess.run(
        [sys.executable, "-m", "train", "--config", "configs/quickstart.py",
         "--workdir", str(tmp_path / "run"), *(f"--config.{k}={v}" for k, v in overrides.items())],
        cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        timeout=300)
    out = run.stdout
    assert run.returncode == 0, out
    lines = out.splitlines()
    count = Counter(lines)

    assert "Downloading" not in out and "downloaded" not in out, out   # nothing is downloaded
    prepared = [line for line in lines if line.startswith("preparing python_stdlib_")]
    assert len(prepared) == 1 and prepared[0].endswith(f"in {data_dir}/local_corpus/"
                                                       f"{prepared[0].split()[1]}/{LocalCorpus.VERSION}"), out
    kept = [line for line in lines if "documents kept" in line]
    assert kept and len(kept) == len(set(kept)) == len({line.split(":")[0] for line in kept}), out
    assert all(line.startswith("python_stdlib [") for line in kept), out
    for what in ("key", "value"):
        assert count[f"['layers_0']['attn']['{what}']['kernel']: dimension 2 not divisible by "
                     "mesh axes tensor; replicated"] == 1, out
    assert "tokenizer of" not in out, out    # data.tokenizer.path is used, not trained

    # no bar when the output is not a terminal: no carriage returns, and each metric line whole
    assert "\r" not in out and "it/s" not in out and "%|" not in out, out
    metrics = [line for line in lines if "step " in line and line.startswith("[")]
    assert [line.split("]")[0] for line in metrics] == [
        "[train/step 0", "[train/step 2", "[eval/step 2", "[train/step 4", "[eval/step 4"], out
    assert all(METRIC_LINE.fullmatch(line) for line in metrics), out
    assert count["--- sample after 4 steps ---"] == 1, out
    # no library chatter: absl's "I0101 12:00:00..." / "W..." lines, or Python logging's prefixes
    assert not [line for line in lines if re.match(r"[IWE]\d{4} |(INFO|WARNING):", line)], out


def test_progress_comes_from_process_0_only_and_problems_from_every_process():
    script = textwrap.dedent("""
        import logging
        import jax
        from configs.loader import configure_logging
        from train.metrics import console

        configure_logging()
        configure_logging()                       # a second call adds no second handler
        jax.process_index = lambda: 1             # as on the second host of a run
        logging.getLogger("data.builder").info("progress on 1")
        logging.getLogger("train.loop").warning("problem on 1")
        console("report on 1")
        jax.process_index = lambda: 0
        logging.getLogger("model.sharding").info("progress on 0")
        console("report on 0")
        logging.getLogger("absl").warning("absl chatter")
        logging.getLogger("jax._src.xla_bridge").warning("jax chatter")
        logging.getLogger("somelib").info("a library's info")
        logging.getLogger("somelib").warning("a library's warning")
    """)
    run = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=_env(),
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == ["report on 0"]
    assert run.stderr.splitlines() == ["problem on 1", "progress on 0", "a library's warning"]
