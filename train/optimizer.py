"""AdamW with warmup + decay schedule and global-norm clipping, all from optax."""
from __future__ import annotations

from typing import Any, Mapping

import jax
import optax

from train import layerwise

NO_DECAY = ("scale", "bias", "pos")  # norm scales, biases, position tables


def schedule(opt_cfg: Mapping[str, Any], total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to opt.lr, then cosine/linear decay to lr*min_lr_ratio, or constant."""
    peak, warmup = opt_cfg["lr"], min(opt_cfg["warmup_steps"], total_steps)
    end = peak * opt_cfg["min_lr_ratio"]
    if opt_cfg["schedule"] == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, max(total_steps, warmup + 1),
                                                  end_value=end)
    decay = (optax.linear_schedule(peak, end, max(total_steps - warmup, 1))
             if opt_cfg["schedule"] == "linear" else optax.constant_schedule(peak))
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def decay_mask(params: Any) -> Any:
    """True for weights that get weight decay: every kernel and embedding, nothing in NO_DECAY."""
    def decays(path, _):
        names = {getattr(k, "key", None) for k in path}
        return not names & set(NO_DECAY)
    return jax.tree_util.tree_map_with_path(decays, params)


def make(opt_cfg: Mapping[str, Any], total_steps: int,
         finetune_cfg: Mapping[str, Any] | None = None
         ) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW (+ clipping); with a `finetune` section, its mode: frozen backbone parameters get
    no optimizer state (set_to_zero), unfreezing schedules and layer-wise LR decay scale each
    update by its layer (train/layerwise.py)."""
    lr = schedule(opt_cfg, total_steps)
    adamw = optax.adamw(lr, b1=opt_cfg["b1"], b2=opt_cfg["b2"], eps=opt_cfg["eps"],
                        weight_decay=opt_cfg["weight_decay"], mask=decay_mask)
    if opt_cfg["clip_norm"] > 0:
        adamw = optax.chain(optax.clip_by_global_norm(opt_cfg["clip_norm"]), adamw)
    if finetune_cfg is None:
        return adamw, lr
    return layerwise.finetune_transform(adamw, finetune_cfg), lr
