"""The optax chain: warmup-cosine schedule, global-norm clipping, AdamW with nanoGPT's decay mask."""
import jax
import optax


def lr_schedule(lr: float, warmup_steps: int, total_steps: int, min_lr_ratio: float):
  """Linear 0 -> lr over `warmup_steps`, then cosine to lr * min_lr_ratio at update `total_steps - 1`."""
  warmup_steps = min(warmup_steps, max(total_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=lr, warmup_steps=warmup_steps,
      decay_steps=max(total_steps - 1, warmup_steps + 1), end_value=lr * min_lr_ratio)


def decay_mask(params):
  """Weight decay on matrices and embeddings (2+ dims) only, never on biases or LayerNorm."""
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_schedule(config, total_steps: int):
  """The run's learning-rate schedule: built once, given to the optimizer and the step's log."""
  return lr_schedule(config.lr, config.warmup_steps, total_steps, config.min_lr_ratio)


def make_optimizer(config, schedule) -> optax.GradientTransformation:
  adamw = optax.adamw(schedule, b1=config.adam_b1, b2=config.adam_b2, eps=1e-8,
                      weight_decay=config.weight_decay, mask=decay_mask)
  if config.gradient_clip > 0:
    return optax.chain(optax.clip_by_global_norm(config.gradient_clip), adamw)
  return adamw
