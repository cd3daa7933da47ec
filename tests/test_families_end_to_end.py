"""Every model family end to end on real text, through the same entry points users run: the
data pipeline of its objective, `train()` with evaluation and Orbax checkpoints, `train.eval`
on the restored best checkpoint with another mesh, and (encoder-decoder) `train.generate`."""
import json
import math

import jax
import pytest

from train import generate as generate_cli
from train.evaluation import evaluate as evaluation
from train.families import OBJECTIVES
from train.loop import train


def family_config(config, objective, **data):
    config.model.update(family=OBJECTIVES[objective].family, pos="learned", n_decoder_layers=1,
                        scan_layers=False)
    config.data.update(**data)
    config.train.update(objective=objective, steps=6, log_every=2)
    config.eval.update(every=3, steps=2)
    config.ckpt.update(every=3)
    return config


def records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("objective,data", [
    ("mlm", {"mlm": {"sentence_pairs": "nsp"}}),
    ("electra", {}),
    ("span_corruption", {}),
])
def test_family_trains_evaluates_and_restores_on_real_text(config, tmp_path, capsys, objective,
                                                          data):
    config = family_config(config, objective)
    for group, values in data.items():
        config.data[group].update(values)
    if objective == "span_corruption":
        config.eval.update(sample_prompt="def main(", sample_tokens=6)
    result = train(config, tmp_path, progress=False)
    assert math.isfinite(result["loss"]) and result["tokens"] > 0
    logged = records(tmp_path / "metrics.jsonl")
    losses = [r["loss"] for r in logged if "loss" in r and "split" not in r and r["step"] > 0]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    evals = [r for r in logged if r.get("split") == "eval"]
    assert [r["step"] for r in evals] == [3, 6]
    if objective == "mlm":    # the NSP head is trained and evaluated next to the MLM loss
        assert 0 <= evals[-1]["pair_accuracy"] <= 1
    if objective == "span_corruption":
        assert "--- sample after 6 steps ---\ndef main( -> " in capsys.readouterr().out
    # the best checkpoint, restored onto one device, evaluates to the training run's numbers
    best = min(evals, key=lambda r: r["loss"])
    evaluation.run(tmp_path, "best", steps=2, devices=jax.devices()[:1])
    again = records(tmp_path / "eval.jsonl")[-1]
    assert again["step"] == best["step"]
    assert again["loss"] == pytest.approx(best["loss"], rel=1e-4)
    if objective == "span_corruption":
        capsys.readouterr()
        generate_cli.main(["--workdir", str(tmp_path), "--prompt", "import os",
                           "--prompt", "x = 1", "--strategy", "beam", "--beam-width", "2",
                           "--max-new-tokens", "5"])
        out = capsys.readouterr().out
        assert out.startswith("import os -> ") and "\nx = 1 -> " in out
