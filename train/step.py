"""Pure train and eval steps, and their jit with explicit shardings and donated state."""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec

from train import pruning
from train.objectives import Objective, Sums
from train.state import TrainState

Batch = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class Teacher:
    """A frozen model the loss reads (knowledge distillation, train/distill/): `loss` is the
    objective called with `teacher=params`; the params are an argument of the jitted step laid
    out by `shardings` (never a compiled-in constant), trained by nothing and checkpointed by no
    one."""
    loss: Objective
    params: Any
    shardings: Any


def _sum_tree(a, b):
    return jax.tree.map(jnp.add, a, b)


def grads_and_sums(objective: Objective, model: nn.Module, params: Any, batch: Batch,
                   rng: jax.Array, *, grad_accum: int, z_loss: float, teacher: Any = None
                   ) -> tuple[Any, Sums]:
    """Gradient of the *summed* loss and metric sums, over `grad_accum` sequential micro-batches
    (`teacher`: the frozen params a distillation objective reads, given no gradient)."""
    frozen = {} if teacher is None else {"teacher": teacher}

    def micro(params, micro_batch, micro_rng):
        loss_fn = functools.partial(objective, model, batch=micro_batch, rng=micro_rng,
                                    train=True, z_loss=z_loss, **frozen)
        return jax.grad(loss_fn, has_aux=True)(params)

    if grad_accum == 1:
        return micro(params, batch, rng)
    # Micro-batch i takes rows i, i+A, i+2A, ...: every device keeps an equal share of each.
    split = jax.tree.map(lambda x: x.reshape((-1, grad_accum) + x.shape[1:]), batch)

    def body(carry, i):
        grads, sums = micro(params, jax.tree.map(lambda x: x[:, i], split),
                            jax.random.fold_in(rng, i))
        return _sum_tree(carry, (grads, sums)), None

    first = micro(params, jax.tree.map(lambda x: x[:, 0], split), jax.random.fold_in(rng, 0))
    (grads, sums), _ = jax.lax.scan(body, first, jnp.arange(1, grad_accum))
    return grads, sums


def train_step(state: TrainState, batch: Batch, teacher: Any = None, *, objective: Objective,
               model: nn.Module, tx: optax.GradientTransformation, lr_schedule: optax.Schedule,
               grad_accum: int, z_loss: float, skip_nonfinite: bool = False
               ) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step on the mean loss over every weighted token of the global batch
    (`teacher`: a distillation teacher's params, see `Teacher`).

    `nonfinite` (0/1) in the metrics flags a NaN/Inf loss or gradient norm; with
    `skip_nonfinite` (train.nonfinite=skip) such a step leaves params and optimizer state as
    they were (the step counter still advances past its batch)."""
    rng = jax.random.fold_in(state.rng, state.step)
    grads, sums = grads_and_sums(objective, model, state.params, batch, rng,
                                 grad_accum=grad_accum, z_loss=z_loss, teacher=teacher)
    weight = jnp.maximum(sums["weight"], 1.0)
    grads = jax.tree.map(lambda g: g / weight, grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {k: v / weight for k, v in sums.items() if k != "weight"}
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
    if skip_nonfinite:
        keep = lambda new, old: jnp.where(finite, new, old)   # noqa: E731
        params = jax.tree.map(keep, params, state.params)
        opt_state = jax.tree.map(keep, opt_state, state.opt_state)
    metrics.update(grad_norm=grad_norm, lr=lr_schedule(state.step), tokens=sums["weight"],
                   nonfinite=(~finite).astype(jnp.int32))
    metrics.update(pruning.sparsity_metrics(opt_state))   # prune.*: the pruned fraction
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_sums(params: Any, batch: Batch, *, objective: Objective, model: nn.Module) -> Sums:
    """Summed loss and metrics of one batch (no dropout); callers divide by the summed weight."""
    _, sums = objective(model, params, batch=batch, rng=jax.random.PRNGKey(0), train=False)
    return sums


def jit_train_step(state_shardings: TrainState, batch_sharding: NamedSharding,
                   teacher_shardings: Any = None, **kwargs):
    """`train_step` compiled with the state donated and laid out by `state_shardings` (and a
    teacher's params by `teacher_shardings`, when distilling)."""
    replicated = NamedSharding(batch_sharding.mesh, PartitionSpec())
    frozen = () if teacher_shardings is None else (teacher_shardings,)
    return jax.jit(functools.partial(train_step, **kwargs),
                   in_shardings=(state_shardings, batch_sharding, *frozen),
                   out_shardings=(state_shardings, replicated), donate_argnums=0)


def jit_eval_step(param_shardings: Any, batch_sharding: NamedSharding, **kwargs):
    replicated = NamedSharding(batch_sharding.mesh, PartitionSpec())
    return jax.jit(functools.partial(eval_sums, **kwargs),
                   in_shardings=(param_shardings, batch_sharding), out_shardings=replicated)
