"""Test set-up: 8 fake CPU devices (set before JAX is imported) and a small real corpus.

The corpus is real text the machine already has (pydoc topics and standard-library modules),
prepared once per session through the same tfds builder and tokenizer trainer users run.
"""
import os
import tempfile

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
# Many tests compile the same small programs; a compilation cache shared by the session (and by
# pytest-xdist workers) compiles each once. Keyed by the program and the jax version.
jax.config.update("jax_compilation_cache_dir", os.environ.get(
    "LOOM_TEST_COMPILATION_CACHE",
    os.path.join(tempfile.gettempdir(), f"loom-test-xla-cache-{os.getuid()}")))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)

from configs.base import get_config  # noqa: E402

# A slice of the stdlib corpus: the 79 pydoc topics and the first standard-library modules.
CORPUS_DOCS = 160


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="session")
def tokenizer_path(data_dir, tmp_path_factory):
    """A 512-piece sentencepiece model trained on the corpus' train split."""
    from data import pipeline
    from data.tokenizer import MODEL_FILE, Tokenizer
    cfg = tiny_config(data_dir, "")
    workdir = tmp_path_factory.mktemp("tokenizer")
    tokenizer = pipeline.load_or_train_tokenizer(cfg.data, workdir)
    assert isinstance(tokenizer, Tokenizer)
    return str(workdir / MODEL_FILE)


def tiny_config(data_dir: str, tokenizer_path: str):
    """A 2-layer decoder on the test corpus; small enough to compile in seconds."""
    c = get_config()
    c.model.update(d_model=32, n_heads=4, n_kv_heads=2, n_layers=2, d_ff=64, max_len=64,
                   dtype="float32", scan_layers=True)
    c.data.update(source="python_stdlib", max_docs=CORPUS_DOCS, validation_percent=10.0,
                  data_dir=data_dir, seq_len=32, batch_size=8, interleave=8, shuffle_window=64)
    c.data.tokenizer.update(path=tokenizer_path, vocab_size=512, sample_chars=400_000)
    c.opt.update(lr=3e-3, warmup_steps=5)
    c.train.update(steps=8, log_every=2)
    c.eval.update(every=4, steps=2, sample_prompt="", sample_tokens=8)
    c.ckpt.update(every=4, keep=2, keep_best=1, async_save=False)
    c.mesh.update(data=-1, fsdp=1, tensor=1)
    return c


def train_run(config, devices, steps, initial=None, keep_params_at=2):
    """Metrics of each step on synthetic batches, the params after `keep_params_at` steps, and
    the initial state on the host (`initial`, when given, is laid out on this mesh instead):
    what the sharded-equals-one-device tests compare."""
    from model.sharding import activate
    from train import families, state as state_lib
    from train.setup import build
    setup = build(config, devices)
    records, kept = [], None
    with activate(setup.mesh, setup.rules):
        if initial is None:
            state = state_lib.init(setup.model, setup.model_cfg, setup.tx,
                                   setup.state_shardings, 0)
            initial = jax.device_get(state)      # the step donates the state's buffers
        else:
            state = jax.device_put(initial, setup.state_shardings)
        step = setup.train_step()
        for i in range(steps):
            state, metrics = step(state, families.synthetic_batch(config, setup.batch_sharding,
                                                                   seed=i))
            records.append(metrics)
            if i + 1 == keep_params_at:
                kept = jax.device_get(state.params)
    return jax.device_get(records), kept, initial


@pytest.fixture(scope="session")
def tokenizer(tokenizer_path):
    from data.tokenizer import Tokenizer
    return Tokenizer.load(tokenizer_path)


@pytest.fixture(scope="session")
def topics():
    """Real English prose: the interpreter's pydoc topics (79 documents, ~600k characters)."""
    from pydoc_data.topics import topics
    return [topics[k] for k in sorted(topics)]


@pytest.fixture
def config(data_dir, tokenizer_path):
    return tiny_config(data_dir, tokenizer_path)
