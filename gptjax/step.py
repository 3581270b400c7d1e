"""The pure compiled steps: train_step(state, batch, rng) -> (state, metrics) and eval_step.

No I/O here. Health statistics (gptjax.monitor) are reductions inside the same step, each under a
`lax.cond` on its interval; the only every-step checks are whether loss and gradient norm are
finite, and a non-finite update is never applied.
"""
import functools
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax

from gptjax import kernels, monitor


class TrainState(flax.struct.PyTreeNode):
  step: jax.Array
  params: Any
  opt_state: Any


def init_state(model, tx, rng, seq_len: int) -> TrainState:
  params = model.init(rng, jnp.zeros((1, seq_len), jnp.int32))["params"]
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def cross_entropy(logits_BTV, targets_BT, kernel: bool = False):
  """Per-token softmax cross-entropy in float32, for logits of any float dtype: optax's, or with
  `kernel` (the plan's loss_kernel) the logsumexp as gptjax.kernels.logsumexp, one read of each
  row, for evaluation (not differentiable: the train step's loss is head_loss)."""
  if not kernel:
    return optax.softmax_cross_entropy_with_integer_labels(logits_BTV.astype(jnp.float32),
                                                            targets_BT)
  target_BT = jnp.take_along_axis(logits_BTV, targets_BT[..., None], axis=-1)[..., 0]
  return kernels.logsumexp(logits_BTV) - target_BT.astype(jnp.float32)


@jax.custom_vjp
def head_loss(x_ND, w_VD, targets_N):
  """The mean cross-entropy of the logits x_ND @ w_VD.T (the tied output head) against targets_N,
  with the plan's loss_kernel: the logits' one read and one write in
  kernels.softmax_cross_entropy_deferred, which leaves the softmax's per-row normalization r to
  the head's backward matmuls (g the loss's cotangent, 1 in the train step):

      d(logits) = g r[:, None] e,   d(x) = g r[:, None] (e @ w),   d(w) = e.T @ (g r[:, None] x).

  The forward pass always computes e, the gradient's main part, differentiated or not: to
  evaluate, take token_losses."""
  return _head_loss_fwd(x_ND, w_VD, targets_N)[0]


def _head_loss_fwd(x_ND, w_VD, targets_N):
  logits_NV = x_ND @ w_VD.T
  lse_N, target_N, r_N, e_NV = kernels.softmax_cross_entropy_deferred(
      logits_NV, targets_N, scale=1.0 / targets_N.size)
  return jnp.mean(lse_N - target_N), (x_ND, w_VD, r_N, e_NV)


def _head_loss_bwd(residuals, g):
  x_ND, w_VD, r_N, e_NV = residuals
  r_N1 = (r_N * g)[:, None]
  # e @ w leaves the matmul in float32 and is rounded once, after the scale.
  dx_ND = (jnp.dot(e_NV, w_VD, preferred_element_type=jnp.float32) * r_N1).astype(x_ND.dtype)
  dw_VD = jnp.dot(e_NV.T, (x_ND * r_N1).astype(x_ND.dtype))
  return dx_ND, dw_VD.astype(w_VD.dtype), None


head_loss.defvjp(_head_loss_fwd, _head_loss_bwd)


def train_loss(model, params, inputs_BT, targets_BT, *, rng=None):
  """The training loss, the mean next-token cross-entropy: with the plan's loss_kernel the tied
  output head and the loss as head_loss, else optax's of the model's logits."""
  if not model.config.loss_kernel:
    return jnp.mean(token_losses(model, params, inputs_BT, targets_BT, rng=rng))
  x_BTD, w_VD = model.apply({"params": params}, inputs_BT, deterministic=rng is None,
                             rngs=None if rng is None else {"dropout": rng}, head=False)
  return head_loss(x_BTD.reshape(-1, x_BTD.shape[-1]), w_VD, targets_BT.reshape(-1))


def logits(model, params, inputs_BT, *, rng=None):
  return model.apply({"params": params}, inputs_BT, deterministic=rng is None,
                     rngs=None if rng is None else {"dropout": rng},
                     logits_dtype=model.config.dtype)


def token_losses(model, params, inputs_BT, targets_BT, *, rng=None):
  return cross_entropy(logits(model, params, inputs_BT, rng=rng), targets_BT,
                       model.config.loss_kernel)


def on_mesh(fn, mesh):
  """`fn` traced with `mesh` as the mesh in context, where gptjax.kernels.per_shard finds it."""
  if mesh is None:
    return fn

  @functools.wraps(fn)
  def traced(*args):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return fn(*args)
  return traced


def make_train_step(model, tx, schedule: Callable, config, sample_idx=None, state_sharding=None,
                    mesh=None, compiler_options=None) -> Callable:
  """Builds the jitted, state-donating train step for `config`'s monitors.

  `state_sharding` (gptjax.sharding) pins the new state to the layout of the old one, so a
  sharded state stays sharded from step to step instead of following XLA's propagation. `mesh`:
  the devices it runs on, for the kernels that run per shard; `compiler_options`: the plan's
  (gptjax.plan.Plan.compiler_options).
  """
  grad_on = bool(config.gradient_monitor)
  weight_on = bool(config.weight_monitor) and sample_idx is not None
  stochastic = config.dropout > 0
  n_micro = config.grad_accum_steps

  def loss_and_grads(params, batch_BT1, rng):
    def loss_fn(params):
      return train_loss(model, params, batch_BT1[:, :-1], batch_BT1[:, 1:], rng=rng)
    return jax.value_and_grad(loss_fn)(params)

  def accumulated(params, batch_BT1, rng):
    """The mean loss and gradient over n_micro micro-batches, one at a time (a lax.scan: the
    activations of one micro-batch live at once). Micro-batch i takes rows i, i + n_micro, ...,
    so each keeps the batch's sharding over the devices."""
    micro_MBT1 = jnp.swapaxes(batch_BT1.reshape(-1, n_micro, batch_BT1.shape[-1]), 0, 1)

    def add(carry, xs):
      i, micro_BT1 = xs
      loss, grads = loss_and_grads(params, micro_BT1,
                                   None if rng is None else jax.random.fold_in(rng, i))
      return jax.tree.map(jnp.add, carry, (loss, grads)), None

    zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
    total, _ = jax.lax.scan(add, zeros, (jnp.arange(n_micro), micro_MBT1))
    return jax.tree.map(lambda x: x / n_micro, total)

  def train_step(state: TrainState, batch_BT1, rng):
    dropout_rng = jax.random.fold_in(rng, state.step) if stochastic else None
    loss, grads = (accumulated if n_micro > 1 else loss_and_grads)(state.params, batch_BT1,
                                                                    dropout_rng)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # A non-finite loss or gradient is never applied (as optax.apply_if_finite); the host stops.
    # A select per array fuses into the update's kernels; a lax.cond over the whole state made
    # the GPU copy every parameter and moment once more.
    new_state = jax.tree.map(
        lambda new, old: jnp.where(finite, new, old),
        TrainState(step=state.step + 1, params=params, opt_state=opt_state), state)

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
          lambda old, new: monitor.weight_stats(old, new, sample_idx), state.params,
          new_state.params)
    # The weight monitor's update is what the step kept (none on a non-finite step): taken from
    # the new state, the update's unselected result need not be kept as a buffer of its own.
    # Sanity also on a non-finite step, whatever the interval, so the host can say where; the
    # params counted are the kept ones (the rejected update is not them).
    metrics["sanity"] = monitor.when(
        monitor.due(step, config.sanity_check_interval) | ~finite,
        monitor.sanity_stats, loss, grads, new_state.params)
    return new_state, metrics

  return jax.jit(on_mesh(train_step, mesh), donate_argnums=(0,),
                 out_shardings=(state_sharding, None), compiler_options=compiler_options)


def make_eval_step(model, mesh=None, compiler_options=None) -> Callable:
  def eval_step(params, inputs_BT, targets_BT, weights_BT):
    losses = token_losses(model, params, inputs_BT, targets_BT)
    return jnp.sum(losses * weights_BT), jnp.sum(weights_BT)

  return jax.jit(on_mesh(eval_step, mesh), compiler_options=compiler_options)
