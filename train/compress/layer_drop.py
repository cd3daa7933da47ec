"""Layer dropping (`train.compress drop-layers`): a run with only some of its blocks.

Every layer stack of the model is cut to the kept blocks, scanned ("layers", a leading layer
axis: sliced) or unrolled ("layers_0", "layers_1", ...: renumbered), and the new run's config
has the new depth. One index list addresses the family's stack(s): the decoder's, the
encoder's, or for ELECTRA both the generator's and the discriminator's (they have the same
depth, model.n_layers). An encoder_decoder model's two stacks are addressed separately
(`keep_encoder` sets model.n_layers, `keep_decoder` model.n_decoder_layers; a stack not named
keeps every block).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from errors import ConfigError
from train.compress import newrun
from train.restore import restore


def parse_keep(text: str, flag: str) -> list[int]:
    """'0,2,3' -> [0, 2, 3]; a one-line ConfigError for anything else."""
    try:
        keep = [int(x) for x in text.split(",")]
    except ValueError:
        raise ConfigError(f"{flag} {text!r}: give block indices separated by commas, e.g. "
                          "0,2,3") from None
    return keep


def check_keep(keep: Sequence[int], n: int, flag: str) -> None:
    bad = [i for i in keep if not 0 <= i < n]
    if bad:
        raise ConfigError(f"{flag}: block(s) {bad} out of range; the model has {n} blocks "
                          f"(0..{n - 1})")
    dup = sorted({i for i in keep if list(keep).count(i) > 1})
    if dup:
        raise ConfigError(f"{flag}: block(s) {dup} listed twice; name each kept block once")
    if list(keep) != sorted(keep):
        raise ConfigError(f"{flag} {','.join(map(str, keep))}: list the kept blocks in "
                          "increasing order (their order in the stack)")


def keep_layers(params: Any, keep: Sequence[int], keep_decoder: Sequence[int] | None = None
                ) -> Any:
    """`params` with every layer stack cut to the kept blocks: `keep_decoder` for a stack under
    a "decoder" module (encoder_decoder), `keep` for the others."""
    def walk(node: Any, in_decoder: bool) -> Any:
        if not isinstance(node, dict):
            return node
        kept = keep_decoder if in_decoder and keep_decoder is not None else keep
        out = {}
        unrolled = {k: v for k, v in node.items() if k.startswith("layers_")
                    and k[len("layers_"):].isdigit()}
        for j, i in enumerate(kept if unrolled else ()):
            out[f"layers_{j}"] = node[f"layers_{i}"]
        for k, v in node.items():
            if k in unrolled:
                continue
            if k == "layers":   # nn.scan: every leaf has a leading layer axis
                idx = jnp.asarray(kept, jnp.int32)
                out[k] = jax.tree.map(lambda x: jnp.take(x, idx, axis=0), v)
            else:
                out[k] = walk(v, in_decoder or k == "decoder")
        return out
    return walk(params, False)


def drop_layers(workdir: str | Path, out: str | Path, *, step: str = "latest",
                keep: Sequence[int] | None = None, keep_encoder: Sequence[int] | None = None,
                keep_decoder: Sequence[int] | None = None) -> dict[str, int]:
    """Writes the run at `workdir` with only the kept blocks as the new run `out`; returns the
    new depth(s) ({'n_layers': ..} and, for encoder_decoder, {'n_decoder_layers': ..})."""
    workdir = Path(workdir).expanduser()
    out = newrun.check_out(out, workdir)
    restored = restore(workdir, step, devices=jax.local_devices()[:1])
    config, cfg = restored.config, restored.setup.model_cfg
    if cfg.family == "encoder_decoder":
        if keep is not None:
            raise ConfigError("an encoder_decoder model has two stacks: use --keep-encoder "
                              "and/or --keep-decoder instead of --keep")
        if keep_encoder is None and keep_decoder is None:
            raise ConfigError("give --keep-encoder and/or --keep-decoder (block indices)")
        enc = list(range(cfg.n_layers)) if keep_encoder is None else list(keep_encoder)
        dec = list(range(cfg.decoder_layers)) if keep_decoder is None else list(keep_decoder)
        check_keep(enc, cfg.n_layers, "--keep-encoder")
        check_keep(dec, cfg.decoder_layers, "--keep-decoder")
        depth = {"n_layers": len(enc), "n_decoder_layers": len(dec)}
    else:
        if keep_encoder is not None or keep_decoder is not None:
            raise ConfigError(f"--keep-encoder/--keep-decoder are for encoder_decoder models; "
                              f"this is a {cfg.family} model: use --keep")
        if keep is None:
            raise ConfigError("give --keep (the block indices to keep, e.g. 0,2,3)")
        enc, dec = list(keep), None
        check_keep(enc, cfg.n_layers, "--keep")
        depth = {"n_layers": len(enc)}
    params = keep_layers(restored.params, enc, dec)
    config.model.update(depth)
    what = (f"{workdir} (step {restored.step}) with blocks {enc}"
            + (f" of the encoder and {dec} of the decoder" if dec is not None else ""))
    newrun.write(out, workdir, config, params, what)
    return depth
