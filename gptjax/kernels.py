"""Pallas (Triton) GPU kernels for the loss, chosen by the run's plan (gptjax.plan: loss_kernel).
Each sees whole rows, so on a mesh of several devices each runs on its device's rows under
shard_map (`per_shard`).

The cross-entropy reads the (B*T, vocab) bf16 logits, the step's largest arrays (3.3 GB at the
medium preset's batch 32). The train step's loss is `softmax_cross_entropy_deferred`: one Triton
program per row streams it in blocks and writes, in the same pass, d(logits) up to a per-row
factor that the output head's backward matmuls apply (gptjax.step.head_loss): one read and one
write of each row, where d(logits) itself needs the row's logsumexp before it can be written (two
reads). `logsumexp` serves per-token losses (evaluation) in one read of each row.

LayerNorm and the GELU backward had Pallas kernels too; measured on and off they gained less than
the 2% a path must gain (bench/RESULTS.md), and XLA runs them.

Off GPU the same kernels run in Pallas' interpreter (slow; the tests use it on small arrays).
"""
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
from jax.sharding import PartitionSpec as P

LSE_BLOCK, LSE_WARPS = 2048, 4           # measured best of 2048..8192 x 4..16 on one H100
DEFER_BLOCK, DEFER_WARPS = 8192, 8       # the train step's loss kernel: best of 2048..16384 x 4..32


def per_shard(fn):
  """`fn` run on each device's rows under jax.shard_map over the mesh in context (the step's, set
  by gptjax.step), for kernels that see whole rows: XLA's partitioner can split its own fusions
  but not a kernel. Every argument and result of `fn` is split by rows (its first axis, over
  every mesh axis, as the batch is). Without a mesh of several devices, `fn` itself."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return fn
  rows = P(mesh.axis_names)
  return jax.shard_map(fn, mesh=mesh, in_specs=rows, out_specs=rows, check_vma=False)


def _interpret() -> bool:
  return jax.default_backend() != "gpu"


def _online_logsumexp(m, s, x):
  """One block's step of a streamed logsumexp: the running max m and sum s of exp(x - m)."""
  m_new = jnp.maximum(m, jnp.max(x))
  shift = jnp.where(m_new == -jnp.inf, 0.0, m_new)   # a row of -inf so far: no nan
  return m_new, s * jnp.exp(m - shift) + jnp.sum(jnp.exp(x - shift))


def _per_row_call(kernel, out_shape, warps: int, name: str, **params):
  """pallas_call of a kernel that sees one row of its arrays (its refs: that row's slices),
  vmapped over the rows: one Triton program per row."""
  return jax.vmap(pl.pallas_call(
      kernel, out_shape=out_shape, grid=(),
      compiler_params=plgpu.CompilerParams(num_warps=warps, num_stages=1),
      interpret=_interpret(), name=name, **params))


def _load_block(ref, i, block: int):
  """Block i of a row (its columns, their in-bounds mask, the values in float32; -inf past the
  row's end)."""
  col = i * block + jnp.arange(block)
  mask = col < ref.shape[0]
  return col, mask, plgpu.load(ref.at[col], mask=mask, other=-jnp.inf).astype(jnp.float32)


def _logsumexp_kernel(x_ref, out_ref, *, block: int):
  def body(i, carry):
    return _online_logsumexp(*carry, _load_block(x_ref, i, block)[2])

  m, s = lax.fori_loop(0, pl.cdiv(x_ref.shape[0], block), body,
                       (jnp.float32(-jnp.inf), jnp.float32(0)))
  out_ref[...] = m + jnp.log(s)


def logsumexp(x):
  """logsumexp over the last axis, in float32: one read of x (one program per row)."""
  call = _per_row_call(functools.partial(_logsumexp_kernel, block=LSE_BLOCK),
                       jax.ShapeDtypeStruct((), jnp.float32), LSE_WARPS, "logsumexp_rows")
  return per_shard(call)(x.reshape(-1, x.shape[-1])).reshape(x.shape[:-1])


# The deferred loss kernel's e = exp(logits - c) takes for c the row's first block max; a later
# block whose max exceeds it by more than this (natural-log units) has the row redone with c = the
# row's max, so that e and its row sums stay well within bfloat16's and float32's range.
DEFER_LIMIT = 32.0


def _deferred_kernel(x_ref, target_ref, e_ref, lse_ref, target_logit_ref, sum_ref, *, block: int):
  n_col = x_ref.shape[0]
  n_block = pl.cdiv(n_col, block)
  # The target's logit, read before its block is written over.
  tcol = target_ref[...] + jnp.arange(1)
  t = jnp.sum(plgpu.load(x_ref.at[tcol], mask=(tcol >= 0) & (tcol < n_col),
                         other=0.0).astype(jnp.float32))
  load = functools.partial(_load_block, block=block)

  _, _, x = load(x_ref, 0)
  c = jnp.max(x)
  c = jnp.where(c == -jnp.inf, 0.0, c)   # a first block of -inf: no nan

  def body(i, carry):
    s, m, first_far = carry
    col, mask, x = load(x_ref, i)
    block_max = jnp.max(x)
    far = (first_far < n_block) | (block_max > c + DEFER_LIMIT)
    # From the first far block on, the logits are left as they are. (A mask that varies within a
    # block, as one leaving out the target's column would, makes the stores scalar, far slower.)
    e = jnp.exp(x - c)
    plgpu.store(e_ref.at[col], e.astype(e_ref.dtype), mask=mask & ~far)
    return (s + jnp.where(far, 0.0, jnp.sum(e)), jnp.maximum(m, block_max),
            jnp.where(far, jnp.minimum(first_far, i), first_far))

  s, m, first_far = lax.fori_loop(0, n_block, body, (jnp.float32(0), c, jnp.int32(n_block)))

  # Rare: a far block. c becomes the row's max: the blocks before it are rescaled, the rest
  # written from their logits. Both loops run no iterations otherwise.
  redo = first_far < n_block
  c_new = jnp.where(redo, m, c)
  factor = jnp.exp(c - c_new)

  @pl.loop(0, jnp.where(redo, first_far, 0))
  def _(i):
    col, mask, e = load(e_ref, i)
    plgpu.store(e_ref.at[col], (e * factor).astype(e_ref.dtype), mask=mask)

  def tail(i, s):
    col, mask, x = load(e_ref, i)   # still the logits
    e = jnp.exp(x - c_new)
    plgpu.store(e_ref.at[col], e.astype(e_ref.dtype), mask=mask)
    return s + jnp.sum(e)

  s = lax.fori_loop(first_far, n_block, tail, s * factor)
  lse_ref[...] = c_new + jnp.log(s)
  target_logit_ref[...] = t
  sum_ref[...] = s


def softmax_cross_entropy_deferred(logits, targets, scale: float):
  """The loss and its gradient in one read and one write of each row of the (N, V) logits, the
  softmax's normalization left to the caller: per row its logsumexp, the target's logit, a float32
  factor r, and e, written over the logits (input_output_aliases), with

      d(mean loss)/d(logits) = (softmax - onehot(target)) * scale = r[:, None] * e,

  e = exp(logits - c) in every column but the target's, exp(logit_target - c) - sum(exp(logits -
  c)) there, and r = scale / sum(exp(logits - c)), for a per-row c: the max of the row's first
  block, or, where a later block's max exceeds it by more than DEFER_LIMIT, the row's max (that row
  is then read a second time). d(logits) itself needs the row's logsumexp before it can be
  written, a second read of the row; e is written as the row is read, and the matmuls that take
  d(logits) apply r to their other operand's rows or to their output's (gptjax.step.head_loss).
  e's values stay within exp(DEFER_LIMIT) x the vocabulary size, in bf16's and float32's range.

  The target's column is set after the kernel, by a scatter of N values into e's buffer, in place:
  a store of that one column inside the kernel would be a mask varying within a block, which
  makes Triton's stores scalar (far slower: bench/HISTORY.md), or a second store to the same
  address by another thread."""
  f32 = jax.ShapeDtypeStruct((), jnp.float32)
  call = _per_row_call(functools.partial(_deferred_kernel, block=DEFER_BLOCK),
                       (jax.ShapeDtypeStruct(logits.shape[-1:], logits.dtype), f32, f32, f32),
                       DEFER_WARPS, "softmax_cross_entropy_deferred", input_output_aliases={0: 0})

  def rows(logits, targets):
    e, lse, target_logit, row_sum = call(logits, targets)   # row_sum = sum(exp(logits - c))
    # exp(t - c) - sum(exp(logits - c)) = (exp(t - lse) - 1) * sum(exp(logits - c)), in float32.
    at_target = (jnp.exp(target_logit - lse) - 1.0) * row_sum
    e = e.at[jnp.arange(e.shape[0]), targets].set(at_target.astype(e.dtype),
                                                   indices_are_sorted=True, unique_indices=True)
    return lse, target_logit, scale / row_sum, e

  return per_shard(rows)(logits, targets)
