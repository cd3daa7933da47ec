"""What a sweep varies: `--sweep KEY=SPEC` parsed into dimensions, expanded into trials by a grid
(the cartesian product of every dimension's values) or by seeded random search.

    KEY=v1,v2,...            values (a grid's axis; random search picks one of them)
    KEY=choice(v1,v2,...)    the same, spelled as a distribution
    KEY=uniform(lo,hi)       a float drawn uniformly from [lo, hi)        (random search only)
    KEY=loguniform(lo,hi)    a float drawn uniformly in log space, lo > 0 (random search only)
    KEY=int(lo,hi)           an integer drawn from lo..hi, both included  (random search only)

A trial is the override text of each swept key (`{"opt.lr": "0.001"}`), applied like
`--config.opt.lr=0.001`; drawn floats are written with `repr`, so they parse back exactly.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
import re
from typing import Sequence

import numpy as np

from errors import ConfigError

DISTRIBUTIONS = ("choice", "uniform", "loguniform", "int")
_CALL = re.compile(r"^(\w+)\((.*)\)$", re.DOTALL)


@dataclasses.dataclass(frozen=True)
class Dimension:
    """One swept key: its value texts (`kind` "values" or "choice"), or a range to draw from."""
    key: str
    spec: str                      # as given on the command line, for sweep.json and plots
    kind: str                      # values | choice | uniform | loguniform | int
    values: tuple[str, ...] = ()
    low: float = 0.0
    high: float = 0.0

    @property
    def drawn(self) -> bool:
        return self.kind in ("uniform", "loguniform", "int")


def split_top_level(text: str) -> list[str]:
    """Splits at commas outside brackets and quotes, so a value may be a tuple: a=(1,2),(3,4)."""
    parts, depth, quote, start = [], 0, "", 0
    for i, ch in enumerate(text):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i].strip())
            start = i + 1
    parts.append(text[start:].strip())
    return parts


def _number(arg: str, key: str, spec: str) -> float:
    try:
        value = float(arg)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise ConfigError(f"--sweep {key}={spec}: {arg!r} is not a finite number")
    return value


def parse_dimension(text: str) -> Dimension:
    """`KEY=SPEC` -> a Dimension; the key and values are checked against a config later
    (`plan.resolve`), the syntax here."""
    key, sep, spec = text.partition("=")
    key, spec = key.strip().removeprefix("--config.").removeprefix("config."), spec.strip()
    if not sep or not key or not spec:
        raise ConfigError(f"--sweep {text!r}: expected KEY=VALUES, e.g. --sweep opt.lr=1e-3,2e-3 "
                          "or --sweep 'opt.lr=loguniform(1e-4,1e-2)'")
    call = _CALL.match(spec)
    if call and call.group(1) in DISTRIBUTIONS:
        kind, args = call.group(1), split_top_level(call.group(2))
        if kind == "choice":
            return _values(key, spec, "choice", args)
        if len(args) != 2:
            raise ConfigError(f"--sweep {key}={spec}: {kind}() takes two bounds, {kind}(lo,hi)")
        low, high = (_number(a, key, spec) for a in args)
        if kind == "int":
            if low != int(low) or high != int(high):
                raise ConfigError(f"--sweep {key}={spec}: int() bounds must be whole numbers")
            if low > high:
                raise ConfigError(f"--sweep {key}={spec}: the low bound exceeds the high one")
        elif low >= high:
            raise ConfigError(f"--sweep {key}={spec}: the low bound must be below the high one")
        if kind == "loguniform" and low <= 0:
            raise ConfigError(f"--sweep {key}={spec}: loguniform() bounds must be positive")
        return Dimension(key, spec, kind, low=low, high=high)
    if call and call.group(1).isidentifier() and not call.group(1)[0].isupper():
        # looks like a distribution but is not one (a typo such as logunifrom(...))
        raise ConfigError(f"--sweep {key}={spec}: unknown distribution {call.group(1)}(); use "
                          f"one of {', '.join(d + '()' for d in DISTRIBUTIONS)} or a list a,b,c")
    return _values(key, spec, "values", split_top_level(spec))


def _values(key: str, spec: str, kind: str, values: list[str]) -> Dimension:
    if not values or any(v == "" for v in values):
        raise ConfigError(f"--sweep {key}={spec}: an empty value; list values as a,b,c")
    if len(set(values)) != len(values):
        raise ConfigError(f"--sweep {key}={spec}: a value is listed twice")
    return Dimension(key, spec, kind, values=tuple(values))


def parse(texts: Sequence[str]) -> list[Dimension]:
    """Every `--sweep`, in order; a key swept twice is refused."""
    if not texts:
        raise ConfigError("nothing to sweep: give at least one --sweep KEY=VALUES")
    dims = [parse_dimension(t) for t in texts]
    seen = set()
    for d in dims:
        if d.key in seen:
            raise ConfigError(f"--sweep {d.key} is given twice; list all its values in one")
        seen.add(d.key)
    return dims


def grid(dims: Sequence[Dimension]) -> list[dict[str, str]]:
    """Every combination of the dimensions' values, the last dimension varying fastest."""
    for d in dims:
        if d.drawn:
            raise ConfigError(f"--sweep {d.key}={d.spec} draws random values: add --random N "
                              "(a grid takes lists, e.g. --sweep opt.lr=1e-3,2e-3)")
    keys = [d.key for d in dims]
    return [dict(zip(keys, combo)) for combo in itertools.product(*(d.values for d in dims))]


def random(dims: Sequence[Dimension], n: int, seed: int) -> list[dict[str, str]]:
    """`n` trials drawn with numpy's PCG64 seeded by `seed`: the same arguments give the same
    trials. Each trial draws its keys in the order of the --sweep flags."""
    if n < 1:
        raise ConfigError(f"--random {n}: give the number of trials to draw (>= 1)")
    rng = np.random.default_rng(seed)
    trials = []
    for _ in range(n):
        trial = {}
        for d in dims:
            if d.kind == "uniform":
                trial[d.key] = repr(float(rng.uniform(d.low, d.high)))
            elif d.kind == "loguniform":
                trial[d.key] = repr(float(math.exp(rng.uniform(math.log(d.low),
                                                               math.log(d.high)))))
            elif d.kind == "int":
                trial[d.key] = str(int(rng.integers(int(d.low), int(d.high) + 1)))
            else:
                trial[d.key] = d.values[int(rng.integers(len(d.values)))]
        trials.append(trial)
    return trials


def _short(value: object) -> str:
    text = f"{value:.4g}" if isinstance(value, float) else str(value)
    return re.sub(r"[^\w.+=-]+", "_", text).strip("_") or "_"


def names(trials: Sequence[dict[str, object]]) -> list[str]:
    """A readable, unique directory name per trial from its values: `lr=0.001,n_layers=2`. A key
    is shortened to its last part unless two swept keys share it; repeated names (random draws
    that round alike) get `-<index>`."""
    keys = list(trials[0]) if trials else []
    last = [k.rsplit(".", 1)[-1] for k in keys]
    short = {k: (s if last.count(s) == 1 else k) for k, s in zip(keys, last)}
    out = [",".join(f"{short[k]}={_short(v)}" for k, v in t.items()) for t in trials]
    counts = {n: out.count(n) for n in out}
    return [f"{n}-{i}" if counts[n] > 1 else n for i, n in enumerate(out)]
