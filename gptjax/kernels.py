"""Pallas (Triton) GPU kernels for the step's memory-bound passes, chosen by the run's plan
(gptjax.plan: loss_kernel; block_kernels, the LayerNorm and GELU-backward ones). Each sees whole
rows, so on a mesh of several devices each runs on its device's rows under shard_map
(`per_shard`).

Loss. The cross-entropy reads the (B*T, vocab) bf16 logits, the step's largest arrays (3.3 GB at
the medium preset's batch 32). The train step's loss is `softmax_cross_entropy_deferred`: one
Triton program per row streams it in blocks and writes, in the same pass, d(logits) up to a
per-row factor that the output head's backward matmuls apply (gptjax.step.head_loss): one read
and one write of each row, where d(logits) itself needs the row's logsumexp before it can be
written (two reads). `logsumexp` serves per-token losses (evaluation) in one read of each row.

GELU. `bias_gelu_grad` is the backward pass of the MLP's GELU(x W + b): d(pre-activation) and the
bias gradient from one read of the saved pre-activation and of d(y), where XLA reduces the bias
gradient in a pass of its own.

LayerNorm. `layer_norm` normalizes rows of d_model in one read and one write; its backward pass
reads x, d(y) and, with `residual`, the residual stream's own gradient once each, and writes d(x)
with that gradient already added, the scale and bias gradients reduced in the same kernel (one
float32 partial per program). XLA splits the same backward into several reductions, each
re-reading the activations.

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


# GELU backward's (rows per block, blocks per program, warps, stages, columns per block)
GELU_BLOCKS = (2, 16, 8, 1, 1024)
# LayerNorm kernels' (rows per block, blocks per program, warps, pipeline stages)
LN_FWD_BLOCKS = (2, 8, 2, 1)
LN_BWD_BLOCKS = (4, 16, 8, 1)


def per_shard(fn, rows_in, rows_out):
  """`fn` run on each device's rows under jax.shard_map over the mesh in context (the step's, set
  by gptjax.step), for kernels that see whole rows: XLA's partitioner can split its own fusions
  but not a kernel. `rows_in` / `rows_out` say, per argument / result (a tuple, or one bool
  for a single result), whether it is split by rows (its first axis, over every mesh axis, as
  the batch is) or whole on every device. A per-program partial sum leaves split by rows,
  stacked over the shards; the caller sums it outside, where XLA adds the collective. Without a
  mesh of several devices, `fn` itself."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return fn
  spec = lambda rows: P(mesh.axis_names) if rows else P()
  out_specs = tuple(map(spec, rows_out)) if isinstance(rows_out, tuple) else spec(rows_out)
  return jax.shard_map(fn, mesh=mesh, in_specs=tuple(map(spec, rows_in)), out_specs=out_specs,
                       check_vma=False)


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
  return per_shard(call, (True,), True)(x.reshape(-1, x.shape[-1])).reshape(x.shape[:-1])


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

  return per_shard(rows, (True, True), (True,) * 4)(logits, targets)


def _columns(d: int):
  col = jnp.arange(pl.next_power_of_2(d))   # Triton blocks are powers of 2; the rest is masked
  return col, col < d


def _rows(program, i, rows: int, steps: int, n: int):
  row = (program * steps + i) * rows + jnp.arange(rows)
  return row, row < n


def _store_partial_sum(ref, program, col, cmask, acc):
  """Writes this program's column sums of acc (rows x columns) to row `program` of ref."""
  at = (jnp.full((1, 1), program), col[None, :])
  plgpu.store(ref.at[at], jnp.sum(acc, axis=0)[None, :], mask=cmask[None, :])


def _row_blocks_call(kernel, blocks, name: str, n: int, out_shape, column_blocks: int = 1,
                     **params):
  """pallas_call of a kernel over n rows, one program per `steps` blocks of `rows` rows (and per
  column block); blocks = (rows, steps, warps, stages). out_shape(programs) gives the outputs."""
  rows, steps, warps, stages = blocks
  programs = pl.cdiv(n, rows * steps)
  return pl.pallas_call(
      functools.partial(kernel, rows=rows, steps=steps, **params),
      out_shape=out_shape(programs), grid=(programs, column_blocks),
      compiler_params=plgpu.CompilerParams(num_warps=warps, num_stages=stages),
      interpret=_interpret(), name=name)


def _layer_norm_fwd_kernel(x_ref, scale_ref, bias_ref, y_ref, mean_ref, rstd_ref, *, eps: float,
                           rows: int, steps: int):
  n, d = x_ref.shape
  col, cmask = _columns(d)
  scale = plgpu.load(scale_ref.at[col], mask=cmask, other=0.0).astype(jnp.float32)
  bias = plgpu.load(bias_ref.at[col], mask=cmask, other=0.0).astype(jnp.float32)
  program = pl.program_id(0)   # read here: Pallas' interpreter has none inside the loop

  @pl.loop(0, steps)
  def _(i):
    row, rmask = _rows(program, i, rows, steps, n)
    mask = rmask[:, None] & cmask[None, :]
    x = plgpu.load(x_ref.at[row[:, None], col[None, :]], mask=mask, other=0.0).astype(jnp.float32)
    mean = jnp.sum(x, axis=1) / d
    xc = jnp.where(cmask[None, :], x - mean[:, None], 0.0)
    rstd = lax.rsqrt(jnp.sum(xc * xc, axis=1) / d + eps)
    y = xc * rstd[:, None] * scale[None, :] + bias[None, :]
    plgpu.store(y_ref.at[row[:, None], col[None, :]], y.astype(y_ref.dtype), mask=mask)
    plgpu.store(mean_ref.at[row], mean, mask=rmask)
    plgpu.store(rstd_ref.at[row], rstd, mask=rmask)


def _layer_norm_bwd_kernel(x_ref, dy_ref, mean_ref, rstd_ref, scale_ref, *refs, rows: int,
                           steps: int, residual: bool):
  dres_ref, (dx_ref, dscale_ref, dbias_ref) = (refs[0], refs[1:]) if residual else (None, refs)
  n, d = x_ref.shape
  col, cmask = _columns(d)
  scale = plgpu.load(scale_ref.at[col], mask=cmask, other=0.0).astype(jnp.float32)
  program = pl.program_id(0)

  def body(i, carry):
    dscale, dbias = carry    # per row of the block; summed over the rows once, at the end
    row, rmask = _rows(program, i, rows, steps, n)
    mask = rmask[:, None] & cmask[None, :]
    at = (row[:, None], col[None, :])
    x = plgpu.load(x_ref.at[at], mask=mask, other=0.0).astype(jnp.float32)
    dy = plgpu.load(dy_ref.at[at], mask=mask, other=0.0).astype(jnp.float32)
    mean = plgpu.load(mean_ref.at[row], mask=rmask, other=0.0)
    rstd = plgpu.load(rstd_ref.at[row], mask=rmask, other=0.0)
    # 0 in masked rows (x, mean and rstd are 0); in masked columns dy and scale are 0 and nothing
    # is stored, so what xhat holds there never counts.
    xhat = (x - mean[:, None]) * rstd[:, None]
    wdy = dy * scale[None, :]
    c1 = jnp.sum(xhat * wdy, axis=1) / d
    c2 = jnp.sum(wdy, axis=1) / d
    dx = (wdy - xhat * c1[:, None] - c2[:, None]) * rstd[:, None]
    if residual:
      dx += plgpu.load(dres_ref.at[at], mask=mask, other=0.0).astype(jnp.float32)
    plgpu.store(dx_ref.at[at], dx.astype(dx_ref.dtype), mask=mask)
    return dscale + dy * xhat, dbias + dy

  zeros = jnp.zeros((rows, col.shape[0]), jnp.float32)
  dscale, dbias = lax.fori_loop(0, steps, body, (zeros, zeros))
  _store_partial_sum(dscale_ref, program, col, cmask, dscale)
  _store_partial_sum(dbias_ref, program, col, cmask, dbias)


def _layer_norm_fwd(x, scale, bias, eps):
  x_ND = x.reshape(-1, x.shape[-1])
  n, d = x_ND.shape

  def rows(x_ND, scale, bias):
    n = x_ND.shape[0]
    out_shape = lambda _: (jax.ShapeDtypeStruct((n, d), x.dtype),
                           jax.ShapeDtypeStruct((n,), jnp.float32),
                           jax.ShapeDtypeStruct((n,), jnp.float32))
    return _row_blocks_call(_layer_norm_fwd_kernel, LN_FWD_BLOCKS, "layer_norm_fwd", n, out_shape,
                            eps=eps)(x_ND, scale, bias)

  y_ND, mean_N, rstd_N = per_shard(rows, (True, False, False), (True,) * 3)(x_ND, scale, bias)
  return y_ND.reshape(x.shape), (x_ND, scale, mean_N, rstd_N)


def _layer_norm_bwd(x_ND, scale, mean_N, rstd_N, dy, dres):
  d = x_ND.shape[1]
  residual = dres is not None

  def rows(x_ND, dy_ND, mean_N, rstd_N, scale, *dres_ND):
    n = x_ND.shape[0]
    out_shape = lambda programs: (jax.ShapeDtypeStruct((n, d), x_ND.dtype),
                                  jax.ShapeDtypeStruct((programs, d), jnp.float32),
                                  jax.ShapeDtypeStruct((programs, d), jnp.float32))
    return _row_blocks_call(_layer_norm_bwd_kernel, LN_BWD_BLOCKS, "layer_norm_bwd", n,
                            out_shape, residual=residual)(x_ND, dy_ND, mean_N, rstd_N, scale,
                                                          *dres_ND)

  args = [x_ND, dy.reshape(-1, d), mean_N, rstd_N, scale] + (
      [dres.reshape(-1, d)] if residual else [])
  dx_ND, dscale_PD, dbias_PD = per_shard(rows, (True,) * 4 + (False,) + (True,) * residual,
                                         (True,) * 3)(*args)
  return dx_ND.reshape(dy.shape), dscale_PD.sum(0), dbias_PD.sum(0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def layer_norm(x, scale, bias, eps: float, residual: bool):
  """LayerNorm over the last axis with flax.linen.LayerNorm's parameters: statistics in float32
  (two-pass variance, in registers), y in x's dtype. With `residual` it returns (x, y): the caller
  continues the residual stream from this x, so that the backward pass adds the stream's gradient
  into d(x) itself."""
  y = _layer_norm_fwd(x, scale, bias, eps)[0]
  return (x, y) if residual else y


def _layer_norm_vjp_fwd(x, scale, bias, eps, residual):
  y, saved = _layer_norm_fwd(x, scale, bias, eps)
  return ((x, y) if residual else y), (saved, bias)


def _layer_norm_vjp_bwd(eps, residual, saved, g):
  del eps
  (x_ND, scale, mean_N, rstd_N), bias = saved
  dres, dy = g if residual else (None, g)
  dx, dscale, dbias = _layer_norm_bwd(x_ND, scale, mean_N, rstd_N, dy, dres)
  return dx, dscale.astype(scale.dtype), dbias.astype(bias.dtype)


layer_norm.defvjp(_layer_norm_vjp_fwd, _layer_norm_vjp_bwd)


GELU_C = 0.7978845608028654   # sqrt(2 / pi)


def gelu_tanh(x):
  """The tanh-approximated GELU (jax.nn.gelu(x, approximate=True)) in x's dtype, written exactly
  as XLA's cuBLAS rewriter matches it for the matmul's GELU epilogue (see gptjax.model.gelu)."""
  return x * (0.5 * (1.0 + jnp.tanh(GELU_C * (x + 0.044715 * (x * (x * x))))))


def gelu_tanh_grad(x):
  """d/dx of gelu_tanh, for float32 x (jnp: used inside the kernel and by gptjax.model's XLA path
  alike)."""
  t = jnp.tanh(GELU_C * (x + 0.044715 * x * x * x))
  return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * GELU_C * (1.0 + 3 * 0.044715 * x * x)


def _bias_gelu_grad_kernel(x_ref, dy_ref, dx_ref, db_ref, *, rows: int, steps: int, cols: int):
  n, f = x_ref.shape
  program = pl.program_id(0)
  col = pl.program_id(1) * cols + jnp.arange(cols)
  cmask = col < f

  def body(i, db):
    row, rmask = _rows(program, i, rows, steps, n)
    mask = rmask[:, None] & cmask[None, :]
    at = (row[:, None], col[None, :])
    x = plgpu.load(x_ref.at[at], mask=mask, other=0.0).astype(jnp.float32)
    dy = plgpu.load(dy_ref.at[at], mask=mask, other=0.0).astype(jnp.float32)
    dx = dy * gelu_tanh_grad(x)
    plgpu.store(dx_ref.at[at], dx.astype(dx_ref.dtype), mask=mask)
    return db + dx

  db = lax.fori_loop(0, steps, body, jnp.zeros((rows, cols), jnp.float32))
  _store_partial_sum(db_ref, program, col, cmask, db)


def bias_gelu_grad(x, dy):
  """For y = gelu(x) with x = h + bias (rows of x: N x F): d(x) in x's dtype and d(bias) =
  sum over rows of d(x), in float32."""
  f = x.shape[-1]
  *blocks, cols = GELU_BLOCKS
  cols = min(cols, pl.next_power_of_2(f))

  def rows(x_NF, dy_NF):
    n = x_NF.shape[0]
    out_shape = lambda programs: (jax.ShapeDtypeStruct((n, f), x.dtype),
                                  jax.ShapeDtypeStruct((programs, f), jnp.float32))
    return _row_blocks_call(_bias_gelu_grad_kernel, blocks, "bias_gelu_grad", n, out_shape,
                            column_blocks=pl.cdiv(f, cols), cols=cols)(x_NF, dy_NF)

  dx_NF, db_PF = per_shard(rows, (True, True), (True, True))(x.reshape(-1, f), dy.reshape(-1, f))
  return dx_NF.reshape(x.shape), db_PF.sum(0)
