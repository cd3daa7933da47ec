"""EleutherAI lm-evaluation-harness model class `loom`: a Loom run scored by the harness.

    python -m train.harness --model_args workdir=runs/x,step=best --tasks hellaswag ...

(`train/harness.py` registers this class and runs lm_eval's own command line; `lm_eval --model
loom` works in any process that has imported this module.) Requests map onto Loom's own scoring:

- loglikelihood (context, continuation): `choices.score_items` on a one-continuation item, so
  the values are exactly `train.eval --choices` scores (same tokenisation at the seam, same
  context truncation to model.max_len); is_greedy is its greedy_match.
- loglikelihood_rolling (text): every token of the text, in the harness's own disjoint rolling
  windows of model.max_len tokens (`choices.rolling_rows`), summed.
- generate_until (context, {"until", "max_gen_toks"}): greedy `generate_text`, cut at the
  first stop string.
"""
from __future__ import annotations

from typing import Any

import jax
import numpy as np
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from model.sharding import activate
from train.decoding import generate
from train.decoding.options import Options
from train.evaluation import choices
from train.restore import restore


@register_model("loom")
class LoomLM(LM):
    def __init__(self, workdir: str, step: str = "latest", max_gen_toks: int = 64, **_: Any):
        super().__init__()
        self.run = restore(workdir, step)
        choices.prompting(self.run.setup.model_cfg)   # a family that writes no text: error
        self.max_gen_toks = int(max_gen_toks)

    def _score(self, pairs: list[tuple[str, str]]) -> list[choices.Scores]:
        items = [choices.Item(c, (x,), None, f"lm_eval request {i}")
                 for i, (c, x) in enumerate(pairs)]
        with activate(self.run.setup.mesh, self.run.setup.rules):
            return choices.score_items(self.run, items)

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        scores = self._score([tuple(r.args) for r in requests])
        return [(float(s.loglik[0]), bool(s.greedy[0])) for s in scores]

    def loglikelihood_rolling(self, requests) -> list[float]:
        texts = [r.args[0] for r in requests]
        rows = [choices.rolling_rows(self.run, text) for text in texts]
        with activate(self.run.setup.mesh, self.run.setup.rules):
            loglik, _ = choices.score_rows(self.run, [row for rs in rows for row in rs])
        out, start = [], 0
        for rs in rows:
            out.append(float(np.sum(loglik[start:start + len(rs)])))
            start += len(rs)
        return out

    def generate_until(self, requests) -> list[str]:
        out = []
        for r in requests:
            context, kwargs = r.args
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            with activate(self.run.setup.mesh, self.run.setup.rules):
                (text,) = generate.generate_text(
                    self.run.setup.model_cfg, self.run.params, self.run.tokenizer, [context],
                    max_new_tokens=int(kwargs.get("max_gen_toks", self.max_gen_toks)),
                    options=Options("greedy"), rng=jax.random.PRNGKey(0))
            for stop in until:
                text = text.split(stop)[0]
            out.append(text)
        return out
