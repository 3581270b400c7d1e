"""Pallas (Triton) GPU kernels for the step's memory-bound passes, used on one GPU (`enabled`).

Loss. The cross-entropy reads the (B*T, vocab) bf16 logits, the step's largest arrays (3.3 GB at
the medium preset's batch 32), for each row's logsumexp and to write d(logits) = softmax - onehot.
One Triton program per row streams it in blocks with an online max: 2.9 TB/s on an H100 (3.35 is
the card's peak) where XLA's fused reduction reaches 1.7 for the logsumexp. The train step's loss
is `softmax_cross_entropy_fused`: both passes in one kernel, d(logits) written over the logits;
`logsumexp` and `softmax_cross_entropy_grad` serve per-token losses (evaluation) and their
gradient. bench/PERF_LOG.md has the figures.

GELU. `bias_gelu_grad` is the backward pass of the MLP's GELU(x W + b): d(pre-activation) and the
bias gradient from one read of the saved pre-activation and of d(y), where XLA reduced the bias
gradient alongside at about 2.5 TB/s.

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

LSE_BLOCK, LSE_WARPS = 2048, 4           # measured best of 2048..8192 x 4..16 on one H100
DLOGITS_BLOCK, DLOGITS_WARPS = 4096, 8


# GELU backward's (rows per block, blocks per program, warps, stages, columns per block)
GELU_BLOCKS = (2, 16, 8, 1, 1024)
# LayerNorm kernels' (rows per block, blocks per program, warps, pipeline stages)
LN_FWD_BLOCKS = (2, 8, 2, 1)
LN_BWD_BLOCKS = (4, 16, 8, 1)


def enabled() -> bool:
  """Whether the step uses these kernels: on one GPU. With several devices the arrays are sharded,
  and XLA's partitioner can split its own fusions but not a kernel, so XLA's versions run there
  (and on CPU and TPU)."""
  return jax.default_backend() == "gpu" and jax.device_count() == 1


def _interpret() -> bool:
  return jax.default_backend() != "gpu"


def _online_logsumexp(m, s, x):
  """One block's step of a streamed logsumexp: the running max m and sum s of exp(x - m)."""
  m_new = jnp.maximum(m, jnp.max(x))
  shift = jnp.where(m_new == -jnp.inf, 0.0, m_new)   # a row of -inf so far: no nan
  return m_new, s * jnp.exp(m - shift) + jnp.sum(jnp.exp(x - shift))


def _softmax_grad_block(x, col, target, lse, g):
  """(softmax - onehot(target)) * g over one block of a row's columns `col`, in float32."""
  return (jnp.exp(x - lse) - (col == target).astype(jnp.float32)) * g


def _per_row_call(kernel, out_shape, warps: int, name: str, **params):
  """pallas_call of a kernel that sees one row of its arrays (its refs: that row's slices),
  vmapped over the rows: one Triton program per row."""
  return jax.vmap(pl.pallas_call(
      kernel, out_shape=out_shape, grid=(),
      compiler_params=plgpu.CompilerParams(num_warps=warps, num_stages=1),
      interpret=_interpret(), name=name, **params))


def _row_logsumexp(x_ref, block: int, target=None):
  """One streamed pass over a row in blocks: its logsumexp (float32) and, given the target's
  column, the target's logit."""
  n_col = x_ref.shape[0]

  def body(i, carry):
    col = i * block + jnp.arange(block)
    x = plgpu.load(x_ref.at[col], mask=col < n_col, other=-jnp.inf).astype(jnp.float32)
    m_s = _online_logsumexp(*carry[:2], x)
    return m_s if target is None else (*m_s, carry[2] + jnp.sum(jnp.where(col == target, x, 0.0)))

  zero = jnp.float32(0)
  init = (jnp.float32(-jnp.inf), zero) + (() if target is None else (zero,))
  m, s, *t = lax.fori_loop(0, pl.cdiv(n_col, block), body, init)
  return m + jnp.log(s), *t


def _write_softmax_grad(x_ref, out_ref, target, lse, g, block: int, backwards: bool = False):
  """One streamed pass over a row in blocks, writing (softmax - onehot(target)) * g; `backwards`
  from its last block to its first."""
  n_col = x_ref.shape[0]
  n_block = pl.cdiv(n_col, block)

  @pl.loop(0, n_block)
  def _(i):
    col = ((n_block - 1 - i) if backwards else i) * block + jnp.arange(block)
    mask = col < n_col
    x = plgpu.load(x_ref.at[col], mask=mask, other=0.0).astype(jnp.float32)
    d = _softmax_grad_block(x, col, target, lse, g)
    plgpu.store(out_ref.at[col], d.astype(out_ref.dtype), mask=mask)


def _logsumexp_kernel(x_ref, out_ref, *, block: int):
  out_ref[...] = _row_logsumexp(x_ref, block)[0]


def logsumexp(x):
  """logsumexp over the last axis, in float32: one read of x (one program per row)."""
  call = _per_row_call(functools.partial(_logsumexp_kernel, block=LSE_BLOCK),
                       jax.ShapeDtypeStruct((), jnp.float32), LSE_WARPS, "logsumexp_rows")
  return call(x.reshape(-1, x.shape[-1])).reshape(x.shape[:-1])


def _softmax_grad_kernel(x_ref, target_ref, lse_ref, g_ref, out_ref, *, block: int):
  _write_softmax_grad(x_ref, out_ref, target_ref[...], lse_ref[...], g_ref[...], block)


def softmax_cross_entropy_grad(logits, targets, lse, g):
  """d(loss)/d(logits) of per-row cross-entropies with upstream gradients g, in the logits' dtype:
  (softmax(logits) - onehot(targets)) * g, with softmax = exp(logits - lse); as
  gptjax.step.softmax_cross_entropy_grad (targets, lse and g: the logits' shape less the last)."""
  call = _per_row_call(functools.partial(_softmax_grad_kernel, block=DLOGITS_BLOCK),
                       jax.ShapeDtypeStruct(logits.shape[-1:], logits.dtype), DLOGITS_WARPS,
                       "softmax_cross_entropy_grad")
  rows = call(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), lse.reshape(-1),
              g.reshape(-1).astype(jnp.float32))
  return rows.reshape(logits.shape)


def _fused_kernel(x_ref, target_ref, r_ref, lse_ref, target_logit_ref, *, block: int,
                  scale: float):
  target = target_ref[...]
  lse, t = _row_logsumexp(x_ref, block, target)   # pass 1, and the target's logit on the way
  lse_ref[...] = lse
  target_logit_ref[...] = t
  # Pass 2, backwards: the blocks read last come first, while still in L2.
  _write_softmax_grad(x_ref, r_ref, target, lse, scale, block, backwards=True)


def softmax_cross_entropy_fused(logits, targets, scale: float):
  """One kernel for the loss and its gradient: per row of the logits its logsumexp and the
  target's logit (float32), and (softmax - onehot(target)) * scale, written over the logits
  (input_output_aliases: the logits' buffer is reused where nothing else reads it).

  Each row is read twice, once per pass; the second pass runs backwards over the row, so that it
  starts with the blocks most likely still in L2. Where logsumexp + softmax_cross_entropy_grad
  keep the logits and write d(logits) beside them, this writes d(logits) in their place: one
  vocabulary-sized buffer less (2.7 GiB for the medium preset at batch 32). Its block settings are
  the d(logits) kernel's (DLOGITS_*); as fast in the step as the two kernels it replaces."""
  call = _per_row_call(
      functools.partial(_fused_kernel, block=DLOGITS_BLOCK, scale=scale),
      (jax.ShapeDtypeStruct(logits.shape[-1:], logits.dtype),
       jax.ShapeDtypeStruct((), jnp.float32), jax.ShapeDtypeStruct((), jnp.float32)),
      DLOGITS_WARPS, "softmax_cross_entropy_fused", input_output_aliases={0: 0})
  d, lse, target_logit = call(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
  return lse.reshape(targets.shape), target_logit.reshape(targets.shape), d.reshape(logits.shape)


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
  out_shape = lambda _: (jax.ShapeDtypeStruct((n, d), x.dtype),
                         jax.ShapeDtypeStruct((n,), jnp.float32),
                         jax.ShapeDtypeStruct((n,), jnp.float32))
  y_ND, mean_N, rstd_N = _row_blocks_call(_layer_norm_fwd_kernel, LN_FWD_BLOCKS, "layer_norm_fwd",
                                          n, out_shape, eps=eps)(x_ND, scale, bias)
  return y_ND.reshape(x.shape), (x_ND, scale, mean_N, rstd_N)


def _layer_norm_bwd(x_ND, scale, mean_N, rstd_N, dy, dres):
  n, d = x_ND.shape
  residual = dres is not None
  out_shape = lambda programs: (jax.ShapeDtypeStruct((n, d), x_ND.dtype),
                                jax.ShapeDtypeStruct((programs, d), jnp.float32),
                                jax.ShapeDtypeStruct((programs, d), jnp.float32))
  args = [x_ND, dy.reshape(n, d), mean_N, rstd_N, scale]
  args += [dres.reshape(n, d)] if residual else []
  dx_ND, dscale_PD, dbias_PD = _row_blocks_call(
      _layer_norm_bwd_kernel, LN_BWD_BLOCKS, "layer_norm_bwd", n, out_shape,
      residual=residual)(*args)
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
  x_NF, dy_NF = x.reshape(-1, x.shape[-1]), dy.reshape(-1, x.shape[-1])
  n, f = x_NF.shape
  *blocks, cols = GELU_BLOCKS
  cols = min(cols, pl.next_power_of_2(f))
  out_shape = lambda programs: (jax.ShapeDtypeStruct((n, f), x.dtype),
                                jax.ShapeDtypeStruct((programs, f), jnp.float32))
  dx_NF, db_PF = _row_blocks_call(_bias_gelu_grad_kernel, blocks, "bias_gelu_grad", n, out_shape,
                                  column_blocks=pl.cdiv(f, cols), cols=cols)(x_NF, dy_NF)
  return dx_NF.reshape(x.shape), db_PF.sum(0)
