"""The train state and its shardings, derived with `jax.eval_shape` before anything exists."""
from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from model.config import ModelConfig
from model.sharding import Rules, logical_shardings, unboxed
from train import families


@flax.struct.dataclass
class TrainState:
    step: jax.Array       # optimizer steps taken
    params: Any
    opt_state: Any
    rng: jax.Array        # raw uint32 key; dropout uses fold_in(rng, step)


def _init_params_boxed(model: nn.Module, cfg: ModelConfig, rng: jax.Array) -> Any:
    return model.init(rng, *families.init_inputs(cfg, model=model))["params"]


def shardings(model: nn.Module, cfg: ModelConfig, tx: optax.GradientTransformation,
              mesh: Mesh, rules: Rules) -> TrainState:
    """NamedShardings of every leaf of the state: params by their logical names, optimizer
    moments like the params they belong to, scalars replicated."""
    boxed = jax.eval_shape(lambda: _init_params_boxed(model, cfg, jax.random.PRNGKey(0)))
    param_sh = logical_shardings(boxed, mesh, rules)
    replicated = NamedSharding(mesh, PartitionSpec())
    abstract_opt = jax.eval_shape(tx.init, unboxed(boxed))
    # frozen parameters (finetune.mode=frozen) hold a MaskedNode, not a moment: keep it
    masked = lambda x: isinstance(x, optax.MaskedNode)   # noqa: E731
    opt_sh = optax.tree_map_params(tx, lambda x, sh: x if masked(x) else sh, abstract_opt,
                                   param_sh, transform_non_params=lambda _: replicated,
                                   is_leaf=masked)
    return TrainState(step=replicated, params=param_sh, opt_state=opt_sh, rng=replicated)


def init(model: nn.Module, cfg: ModelConfig, tx: optax.GradientTransformation,
         state_shardings: TrainState, seed: int) -> TrainState:
    """A fresh state, created directly in its shards (never materialised on one device)."""
    def create():
        init_rng, dropout_rng = jax.random.split(jax.random.PRNGKey(seed))
        params = nn.meta.unbox(_init_params_boxed(model, cfg, init_rng))
        return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          opt_state=tx.init(params), rng=dropout_rng)
    return jax.jit(create, out_shardings=state_shardings)()


def from_params(params: Any, tx: optax.GradientTransformation, state_shardings: TrainState,
                seed: int) -> TrainState:
    """A state at step 0 around existing params (imported weights): fresh optimizer moments and
    the dropout RNG `init` would draw for `seed`, laid out by `state_shardings`."""
    def create(params):
        _, dropout_rng = jax.random.split(jax.random.PRNGKey(seed))
        return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          opt_state=tx.init(params), rng=dropout_rng)
    return jax.jit(create, in_shardings=(state_shardings.params,),
                   out_shardings=state_shardings)(params)


def abstract(model: nn.Module, cfg: ModelConfig, tx: optax.GradientTransformation,
             state_shardings: TrainState) -> TrainState:
    """ShapeDtypeStructs carrying the target shardings: what a checkpoint is restored into."""
    shapes = jax.eval_shape(lambda: init(model, cfg, tx, state_shardings, 0))
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        shapes, state_shardings)


def param_count(params: Any) -> int:
    return sum(x.size for x in jax.tree.leaves(params))
