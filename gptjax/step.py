"""The pure compiled steps: train_step(state, batch, rng) -> (state, metrics) and eval_step.

No I/O here. Health statistics (gptjax.monitor) are reductions inside the same step, each under a
`lax.cond` on its interval; the only every-step checks are whether loss and gradient norm are
finite, and a non-finite update is never applied.
"""
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax

from gptjax import monitor


class TrainState(flax.struct.PyTreeNode):
  step: jax.Array
  params: Any
  opt_state: Any


def init_state(model, tx, rng, seq_len: int) -> TrainState:
  params = model.init(rng, jnp.zeros((1, seq_len), jnp.int32))["params"]
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def token_losses(model, params, inputs_BT, targets_BT, *, rng=None):
  logits_BTV = model.apply({"params": params}, inputs_BT, deterministic=rng is None,
                           rngs=None if rng is None else {"dropout": rng})
  return optax.softmax_cross_entropy_with_integer_labels(logits_BTV, targets_BT)


def make_train_step(model, tx, schedule: Callable, config, sample_idx=None) -> Callable:
  """Builds the jitted, state-donating train step for `config`'s monitors."""
  grad_on = bool(config.gradient_monitor)
  weight_on = bool(config.weight_monitor) and sample_idx is not None
  stochastic = config.dropout > 0

  def train_step(state: TrainState, batch_BT1, rng):
    inputs, targets = batch_BT1[:, :-1], batch_BT1[:, 1:]
    dropout_rng = jax.random.fold_in(rng, state.step) if stochastic else None

    def loss_fn(params):
      return jnp.mean(token_losses(model, params, inputs, targets, rng=dropout_rng))

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # A non-finite loss or gradient is never applied (as optax.apply_if_finite); the host stops.
    new_state = jax.lax.cond(
        finite,
        lambda: TrainState(step=state.step + 1, params=params, opt_state=opt_state),
        lambda: state)

    metrics = {"loss": loss, "grad_norm": grad_norm, "lr": schedule(state.step),
               "finite": finite}
    step = state.step
    if grad_on:
      metrics["grad"] = monitor.when(
          monitor.due(step, config.gradient_monitor_interval),
          lambda g, n: monitor.gradient_stats(g, n, config.gradient_clip), grads, grad_norm)
    if weight_on:
      metrics["weight"] = monitor.when(
          monitor.due(step, config.weight_monitor_interval),
          lambda p, u: monitor.weight_stats(p, u, sample_idx), state.params, updates)
    metrics["sanity"] = monitor.when(
        monitor.due(step, config.sanity_check_interval) | ~finite,
        monitor.sanity_stats, loss, grads, params)
    return new_state, metrics

  return jax.jit(train_step, donate_argnums=(0,))


def make_eval_step(model) -> Callable:
  def eval_step(params, inputs_BT, targets_BT, weights_BT):
    losses = token_losses(model, params, inputs_BT, targets_BT)
    return jnp.sum(losses * weights_BT), jnp.sum(weights_BT)

  return jax.jit(eval_step)
