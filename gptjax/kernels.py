"""Pallas (Triton) GPU kernels for the loss's two passes over the logits, the step's largest arrays.

The cross-entropy reads the (B*T, vocab) bf16 logits twice: once for each row's logsumexp
(forward) and once to write d(logits) = softmax - onehot (backward). These are pure memory
traffic, 3.3 GB each at the medium preset's batch 32. XLA's fused reduction reaches 1.7 TB/s on
an H100 for the first, where one Triton program per row, streaming the row in blocks with an
online max, reaches 2.9 TB/s (3.35 is the card's peak); the second gains less (2.7 -> 2.9 TB/s).
bench/PERF_LOG.md has the figures.

Off GPU the same kernels run in Pallas' interpreter (slow; the tests use it on small arrays).
"""
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

LSE_BLOCK, LSE_WARPS = 2048, 4           # measured best of 2048..8192 x 4..16 on one H100
DLOGITS_BLOCK, DLOGITS_WARPS = 4096, 8


def _interpret() -> bool:
  return jax.default_backend() != "gpu"


def _logsumexp_kernel(x_ref, out_ref, *, block: int):
  n_col = x_ref.shape[0]

  def body(i, carry):
    m, s = carry
    col = i * block + jnp.arange(block)
    x = plgpu.load(x_ref.at[col], mask=col < n_col, other=-jnp.inf).astype(jnp.float32)
    m_new = jnp.maximum(m, jnp.max(x))
    shift = jnp.where(m_new == -jnp.inf, 0.0, m_new)   # a row of -inf so far: no nan
    return m_new, s * jnp.exp(m - shift) + jnp.sum(jnp.exp(x - shift))

  m, s = lax.fori_loop(0, pl.cdiv(n_col, block), body, (jnp.float32(-jnp.inf), jnp.float32(0)))
  out_ref[...] = m + jnp.log(s)


def logsumexp(x):
  """logsumexp over the last axis, in float32: one read of x (one program per row)."""
  call = pl.pallas_call(
      functools.partial(_logsumexp_kernel, block=LSE_BLOCK),
      out_shape=jax.ShapeDtypeStruct((), jnp.float32), grid=(),
      compiler_params=plgpu.CompilerParams(num_warps=LSE_WARPS, num_stages=1),
      interpret=_interpret(), name="logsumexp_rows")
  return jax.vmap(call)(x.reshape(-1, x.shape[-1])).reshape(x.shape[:-1])


def _softmax_grad_kernel(x_ref, target_ref, lse_ref, g_ref, out_ref, *, block: int):
  n_col = x_ref.shape[0]
  target, lse, g = target_ref[...], lse_ref[...], g_ref[...]

  @pl.loop(0, pl.cdiv(n_col, block))
  def _(i):
    col = i * block + jnp.arange(block)
    mask = col < n_col
    x = plgpu.load(x_ref.at[col], mask=mask, other=0.0).astype(jnp.float32)
    d = (jnp.exp(x - lse) - (col == target).astype(jnp.float32)) * g
    plgpu.store(out_ref.at[col], d.astype(out_ref.dtype), mask=mask)


def softmax_cross_entropy_grad(logits, targets, lse, g):
  """d(loss)/d(logits) of per-row cross-entropies with upstream gradients g, in the logits' dtype:
  (softmax(logits) - onehot(targets)) * g, with softmax = exp(logits - lse); as
  gptjax.step.softmax_cross_entropy_grad (targets, lse and g: the logits' shape less the last)."""
  call = pl.pallas_call(
      functools.partial(_softmax_grad_kernel, block=DLOGITS_BLOCK),
      out_shape=jax.ShapeDtypeStruct(logits.shape[-1:], logits.dtype), grid=(),
      compiler_params=plgpu.CompilerParams(num_warps=DLOGITS_WARPS, num_stages=1),
      interpret=_interpret(), name="softmax_cross_entropy_grad")
  rows = jax.vmap(call)(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                        lse.reshape(-1), g.reshape(-1).astype(jnp.float32))
  return rows.reshape(logits.shape)
