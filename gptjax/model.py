"""The GPT: a Flax linen decoder-only transformer and its frozen ModelConfig.

GPT-2 layout: token + learned position embeddings, pre-LN blocks (causal self-attention, GELU MLP),
a final LayerNorm and an output head tied to the token embedding. Parameters are float32; the
activations run in `dtype` (bfloat16 on accelerators); the logits are returned in float32 unless
the caller asks for another dtype (the training loss takes them in the compute dtype).
Nothing here knows about training.
"""
import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from gptjax import cublaslt, kernels, xla_flags


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  vocab_size: int            # padded (multiple of 128) for fast matmuls; see padded_vocab_size
  d_model: int = 256
  num_heads: int = 4
  num_layers: int = 4
  d_ff: int = 512
  max_seq_len: int = 256
  dropout: float = 0.1
  dtype: jnp.dtype = jnp.float32
  attention: str = "xla"     # "xla" | "cudnn"
  remat: bool = False
  layer_norm_epsilon: float = 1e-6  # flax's; GPT-2's checkpoints use 1e-5


def padded_vocab_size(n_vocab: int, multiple: int = 128) -> int:
  return multiple * math.ceil(n_vocab / multiple)


def _gelu_form(x):
  """jax.nn.gelu(x, approximate=True) in x's dtype, written as XLA can fuse it on this platform.

  On a GPU with gptjax.xla_flags' epilogue flags in effect it is written in x's dtype and in
  exactly the form XLA's cuBLAS rewriter matches: applied to the output of a 2-D matmul plus bias
  (see DenseGELU) it becomes that matmul's BIAS_GELU_AUX epilogue, computed in float32 on the
  accumulator. Elsewhere there is no epilogue to match, and it runs in float32 (in bf16 element by
  element it would lose precision).
  """
  if jax.default_backend() == "gpu" and xla_flags.epilogue_fusion_on():
    return kernels.gelu_tanh(x)
  return kernels.gelu_tanh(x.astype(jnp.float32)).astype(x.dtype)


@jax.custom_vjp
def gelu(x):
  """jax.nn.gelu(x, approximate=True), returned in x's dtype (_gelu_form), with a backward pass
  that recomputes tanh from x (the MLP's saved pre-activation) behind an optimization barrier, so
  nothing else is saved. Autodiff through jax.nn.gelu makes XLA keep an extra activation-sized
  intermediate of every MLP: 2.3 GiB of the medium preset's 19.4 at batch 32 (bench/HISTORY.md).
  """
  return _gelu_form(x)


def _gelu_fwd(x):
  return gelu(x), x


def _gelu_bwd(x, dy):
  xf = jax.lax.optimization_barrier(x).astype(jnp.float32)  # recompute, don't share with fwd
  return ((dy.astype(jnp.float32) * kernels.gelu_tanh_grad(xf)).astype(x.dtype),)


gelu.defvjp(_gelu_fwd, _gelu_bwd)


@jax.custom_vjp
def bias_gelu(h, bias):
  """gelu(h + bias), whose backward pass is gptjax.kernels.bias_gelu_grad's Pallas kernel: d(h)
  and d(bias) in one pass over the saved pre-activation h + bias (which the matmul's GELU epilogue
  writes anyway) and d(y). For one GPU (kernels.enabled); elsewhere DenseGELU uses gelu."""
  return _bias_gelu_fwd(h, bias)[0]


def _bias_gelu_fwd(h, bias):
  x = h + bias
  return _gelu_form(x), (x, bias)


def _bias_gelu_bwd(saved, dy):
  x, bias = saved
  dx, dbias = kernels.bias_gelu_grad(x, dy)
  return dx, dbias.astype(bias.dtype)


bias_gelu.defvjp(_bias_gelu_fwd, _bias_gelu_bwd)


class _Dense(nn.Dense):
  """nn.Dense's fields and parameters ('kernel', 'bias'), for layers that compute with them in
  their own way."""

  def declared(self, in_features: int):
    """(kernel, bias), declared as nn.Dense declares them, in the parameters' dtype."""
    kernel = self.param("kernel", self.kernel_init, (in_features, self.features), self.param_dtype)
    return kernel, self.param("bias", self.bias_init, (self.features,), self.param_dtype)

  def promoted(self, x, input_bias=None):
    """(x, kernel, bias) in the compute dtype. With `input_bias` (a vector added to every row of
    x), bias becomes input_bias @ kernel + bias, computed in the parameters' dtype:
    (x + c) W + b = x W + (c W + b)."""
    kernel, bias = self.declared(x.shape[-1])
    if input_bias is not None:
      bias = jnp.dot(input_bias, kernel, precision=jax.lax.Precision.HIGHEST) + bias
    return nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)


class Dense(_Dense):
  """nn.Dense, which can also take a vector added to every row of its input into its bias."""

  @nn.compact
  def __call__(self, x, input_bias=None):
    x, kernel, bias = self.promoted(x, input_bias)
    return x @ kernel + bias


class DenseGELU(_Dense):
  """gelu(nn.Dense(features)(x)) on 2-D rows, with nn.Dense's parameters and arithmetic: the
  matmul's output is the GELU's direct operand, as cuBLASLt's epilogue fusion needs (gelu);
  through a reshape XLA would fuse no GELU, or compute the matmul twice."""

  @nn.compact
  def __call__(self, x_NK):
    x_NK, kernel, bias = self.promoted(x_NK)
    h_NF = x_NK @ kernel
    if kernels.enabled():
      return bias_gelu(h_NF, bias)
    # The bias add's own autodiff: XLA fuses its gradient into gelu's backward pass (reduced
    # inside a custom VJP, XLA made it a separate, slower pass: bench/HISTORY.md).
    return gelu(h_NF + bias)


class DenseParams(_Dense):
  """nn.Dense's parameters alone ('kernel', 'bias'), in the compute dtype, for a caller that
  applies them itself (MLP)."""

  @nn.compact
  def __call__(self, in_features: int):
    return nn.dtypes.promote_dtype(*self.declared(in_features), dtype=self.dtype)


# The columns LayerNorm appends to the MLP's input on the gelu_mlp path: a 1, then 0s up to a
# multiple of 8, cuBLAS's alignment of bf16 rows.
BIAS_COLUMNS = 8


def with_bias_row(kernel_KF, bias_F, bias_columns: int = BIAS_COLUMNS):
  """The (K + bias_columns, F) weight whose product with LayerNorm(bias_columns)'s rows adds the
  bias: kernel, then the bias, then zeros. Its gradient's bias row is the bias gradient."""
  zeros = jnp.zeros((bias_columns - 1, kernel_KF.shape[1]), kernel_KF.dtype)
  return jnp.concatenate([kernel_KF, bias_F[None].astype(kernel_KF.dtype), zeros])


@jax.custom_vjp
def gelu_mlp(x_NK, w1_KF, w2_FD):
  """gelu(x @ w1) @ w2 on rows, whose backward pass takes d(gelu's input) from one matmul:
  gptjax.cublaslt.dgelu_bgrad, cuBLASLt's DGELU epilogue reading the pre-activation that the
  forward matmul's GELU_AUX epilogue saved. (Where the op does not apply, the same arithmetic in
  XLA: dgelu_bgrad_reference.) The first layer's bias comes in x's ones column and w1's bias row
  (with_bias_row), so that its gradient is a row of w1's gradient matmul: no bias epilogue
  forward, no separate sum over the rows backward (bench/HISTORY.md, item 48). Cotangents come
  back in the primals' dtypes."""
  return _gelu_mlp_fwd(x_NK, w1_KF, w2_FD)[0]


def _gelu_mlp_fwd(x_NK, w1_KF, w2_FD):
  pre_NF = x_NK @ w1_KF
  h_NF = _gelu_form(pre_NF)
  return h_NF @ w2_FD, (x_NK, w1_KF, pre_NF, h_NF, w2_FD)


def _gelu_mlp_bwd(saved, dy_ND):
  x_NK, w1_KF, pre_NF, h_NF, w2_FD = saved
  fused = cublaslt.applies(pre_NF.dtype, w2_FD.shape[0])
  dgelu_bgrad = cublaslt.dgelu_bgrad if fused else cublaslt.dgelu_bgrad_reference
  # Its bias sum unused, XLA drops it.
  d_pre_NF = dgelu_bgrad(dy_ND.astype(pre_NF.dtype), w2_FD.T.astype(pre_NF.dtype), pre_NF)[0]
  grads = (d_pre_NF @ w1_KF.T, x_NK.T @ d_pre_NF, h_NF.T @ dy_ND.astype(h_NF.dtype))
  return tuple(g.astype(p.dtype) for g, p in zip(grads, (x_NK, w1_KF, w2_FD)))


gelu_mlp.defvjp(_gelu_mlp_fwd, _gelu_mlp_bwd)


def fused_mlp_backward(dtype, d_ff: int) -> bool:
  """Whether MLP runs as gelu_mlp with cuBLASLt's epilogue: on one GPU (kernels.enabled), where
  the op applies (gptjax.cublaslt.applies: bf16 compute, d_ff a multiple of 8, the extension
  built)."""
  return kernels.enabled() and cublaslt.applies(dtype, d_ff)


class LayerNorm(nn.LayerNorm):
  """flax.linen.LayerNorm (its parameters and options), run as gptjax.kernels' Pallas kernels on
  one GPU and as flax's own elsewhere.

  With `residual=True` it returns (x, LayerNorm(x)), and the caller continues the residual stream
  from that x: the kernels' backward pass then adds the stream's gradient into d(x) as it writes
  it, instead of XLA adding it in another pass over the activations.
  """

  @nn.compact
  def __call__(self, x, residual: bool = False, bias_columns: int = 0):
    """`bias_columns` > 0 appends that many columns to the output, a 1 and then 0s (see
    with_bias_row)."""
    if kernels.enabled():
      features = (x.shape[-1],)
      scale = self.param("scale", self.scale_init, features, self.param_dtype)
      bias = self.param("bias", self.bias_init, features, self.param_dtype)
      out = kernels.layer_norm(x, scale, bias, self.epsilon, residual, bias_columns)
      x, y = out if residual else (x, out)
      y = y.astype(self.dtype or x.dtype)
    else:
      y = super().__call__(x)
      if bias_columns:
        ones = jnp.zeros(y.shape[:-1] + (bias_columns,), y.dtype).at[..., 0].set(1)
        y = jnp.concatenate([y, ones], axis=-1)
    return (x, y) if residual else y


def _init(std):
  return nn.initializers.normal(stddev=std)


@jax.custom_vjp
def qkv_matmuls(x, kernel, q_bias):
  """(q, k, v) = x @ kernel as three matmuls, one per third of the kernel's columns, q_bias added
  to q (k and v leave without bias: see QKVDense).

  Its backward pass adds the three input gradients as dq Wq^T + (dk Wk^T + dv Wv^T), each sum
  with a plain matmul's output as its first operand: XLA's cuBLAS rewriter turns an add into a
  matmul's C input (beta = 1) only when the add's first operand is a matmul without one, and
  autodiff's order, ((dv Wv^T + dk Wk^T) + dq Wq^T), left the second add a pass of its own
  (bench/HISTORY.md)."""
  return _qkv_matmuls_fwd(x, kernel, q_bias)[0]


def _thirds(a):
  return jnp.split(a, 3, axis=-1)


def _qkv_matmuls_fwd(x, kernel, q_bias):
  wq, wk, wv = _thirds(kernel)
  return (x @ wq + q_bias, x @ wk, x @ wv), (x, kernel, q_bias)


def _qkv_matmuls_bwd(saved, dqkv):
  x, kernel, q_bias = saved
  (wq, wk, wv), (dq, dk, dv) = _thirds(kernel), dqkv
  dx = dq @ wq.T + (dk @ wk.T + dv @ wv.T)
  rows = lambda a: a.reshape(-1, a.shape[-1])
  dkernel = jnp.concatenate([rows(x).T @ rows(d) for d in dqkv], axis=1)
  dq_bias = jnp.sum(rows(dq).astype(jnp.float32), axis=0)
  return dx, dkernel, dq_bias.astype(q_bias.dtype)


qkv_matmuls.defvjp(_qkv_matmuls_fwd, _qkv_matmuls_bwd)


class QKVDense(_Dense):
  """q, k and v for attention: nn.Dense(features = 3 * d) split in three, with nn.Dense's
  parameters. Returns (q, k, v, v_bias): with v_bias None, exactly nn.Dense's output split.

  On one GPU with XLA's dot merger off (gptjax.xla_flags) it runs three matmuls on column
  slices of the kernel, so that q, k and v each leave their own matmul contiguous, as cuDNN's
  attention takes them; slicing one (B, T, 3D) output copies them, and their gradients are
  concatenated (bench/HISTORY.md). With the merger on, XLA
  merges the three back into one matmul, sliced: there, and elsewhere, it is one matmul.

  The three matmuls leave k and v without their biases, which attention does not need where
  they are: k's bias adds q . b_k to all of a query's scores alike, which softmax cancels, so its
  gradient is 0; v's bias reaches every output row whole (the attention weights sum to 1), so
  it is returned as v_bias for the output projection to take into its own bias
  (_Dense.promoted's input_bias). Two bias epilogues and two bias-gradient passes over
  (B*T, d) fewer per block."""

  @nn.compact
  def __call__(self, x):
    kernel, bias = self.declared(x.shape[-1])
    x_c, kernel_c, bias_c = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    if separate_qkv_matmuls():
      d = self.features // 3
      return (*qkv_matmuls(x_c, kernel_c, bias_c[:d]), bias[2 * d:])
    return (*_thirds(x_c @ kernel_c + bias_c), None)


def separate_qkv_matmuls() -> bool:
  """Whether QKVDense runs three matmuls: on one GPU, with XLA's dot merger off. A run of several
  processes with one GPU each gets the flag too (gptjax.xla_flags counts the GPUs a process sees),
  but keeps one matmul: the three are measured on one device only."""
  return kernels.enabled() and xla_flags.dot_merger_off()


class CausalSelfAttention(nn.Module):
  """Causal multi-head self-attention of x (B, T, D); returns the output projection as rows
  (B*T, D), the layout in which Block adds it to the residual stream.

  Where QKVDense leaves k's and v's biases out (its v_bias not None), the projection takes v's:
  exact because every query sees at least one key (causal, and the decode mask keeps each query's
  own position) and the attention weights are not dropped out, so each row's weights sum to 1.
  Attention dropout, or a mask that can leave a row without keys, would need v's bias back on v."""
  config: ModelConfig

  @nn.compact
  def __call__(self, x_BTD, *, deterministic: bool, cache_index=None):
    cfg = self.config
    head_dim = cfg.d_model // cfg.num_heads
    B, T, D = x_BTD.shape
    *qkv, v_bias = QKVDense(3 * D, dtype=cfg.dtype, kernel_init=_init(0.02), name="qkv")(x_BTD)
    q_BTNH, k_BTNH, v_BTNH = (y_BTD.reshape(B, T, cfg.num_heads, head_dim) for y_BTD in qkv)
    if cache_index is None:
      y_BTNH = jax.nn.dot_product_attention(q_BTNH, k_BTNH, v_BTNH, is_causal=True,
                                            implementation=cfg.attention)
    else:
      k_BLNH, v_BLNH, mask_11TL = self._write_cache(k_BTNH, v_BTNH, cache_index)
      y_BTNH = jax.nn.dot_product_attention(q_BTNH, k_BLNH, v_BLNH, mask=mask_11TL,
                                            implementation="xla")
    # GPT-2: residual projections scaled by 1/sqrt(2 * num_layers).
    y_ND = Dense(D, dtype=cfg.dtype, name="proj", kernel_init=_init(
        0.02 / math.sqrt(2 * cfg.num_layers)))(y_BTNH.reshape(B * T, D), input_bias=v_bias)
    return nn.Dropout(cfg.dropout)(y_ND, deterministic=deterministic)   # rows, as Block adds them

  def _write_cache(self, k_BTNH, v_BTNH, index):
    """Decode mode: writes the T new keys/values at `index` of a fixed-size cache (L =
    max_seq_len, so one compiled shape serves every step) and masks what query t may not see."""
    B, T, N, H = k_BTNH.shape
    L = self.config.max_seq_len
    key = self.variable("cache", "key", jnp.zeros, (B, L, N, H), k_BTNH.dtype)
    value = self.variable("cache", "value", jnp.zeros, (B, L, N, H), v_BTNH.dtype)
    key.value = jax.lax.dynamic_update_slice(key.value, k_BTNH, (0, index, 0, 0))
    value.value = jax.lax.dynamic_update_slice(value.value, v_BTNH, (0, index, 0, 0))
    mask_TL = jnp.arange(L)[None, :] <= index + jnp.arange(T)[:, None]
    return key.value, value.value, mask_TL[None, None]


class MLP(nn.Module):
  config: ModelConfig

  @nn.compact
  def __call__(self, x_ND, *, deterministic: bool):
    """Rows (B*T, D) in and out. Rows with LayerNorm's bias columns appended (as Block gives
    them where fused_mlp_backward) run as gelu_mlp, b1 as w1's bias row."""
    cfg = self.config
    fc_init, proj_init = _init(0.02), _init(0.02 / math.sqrt(2 * cfg.num_layers))
    bias_columns = x_ND.shape[-1] - cfg.d_model
    if bias_columns:
      w1_KF, b1_F = DenseParams(cfg.d_ff, dtype=cfg.dtype, kernel_init=fc_init, name="fc")(
          cfg.d_model)
      w2_FD, b2_D = DenseParams(cfg.d_model, dtype=cfg.dtype, kernel_init=proj_init,
                                name="proj")(cfg.d_ff)
      w1_KF = with_bias_row(w1_KF, b1_F, bias_columns)
      y_ND = gelu_mlp(x_ND.astype(cfg.dtype), w1_KF, w2_FD) + b2_D
    else:
      h_NF = DenseGELU(cfg.d_ff, dtype=cfg.dtype, kernel_init=fc_init, name="fc")(x_ND)
      y_ND = nn.Dense(cfg.d_model, dtype=cfg.dtype, name="proj", kernel_init=proj_init)(h_NF)
    return nn.Dropout(cfg.dropout)(y_ND, deterministic=deterministic)


class Block(nn.Module):
  """A pre-LN block. Inside it the residual stream is rows (B*T, D): each residual add then takes
  the stream itself, which the LayerNorms use too, and XLA fuses the add into the projection's
  matmul as its C input, written out of place. Added through a (B, T, D) reshape, the stream
  reached the add as a view of no other use: XLA wrote the matmul over it in place and so had to
  copy the stream first (24 copies per step of the medium preset)."""
  config: ModelConfig

  @nn.compact
  def __call__(self, x_BTD, deterministic: bool, cache_index=None):
    cfg = self.config
    B, T, D = x_BTD.shape
    x_ND, h_ND = LayerNorm(cfg.layer_norm_epsilon, dtype=cfg.dtype, name="ln1")(
        x_BTD.reshape(B * T, D), residual=True)
    x_ND = x_ND + CausalSelfAttention(cfg, name="attn")(
        h_ND.reshape(B, T, D), deterministic=deterministic, cache_index=cache_index)
    bias_columns = BIAS_COLUMNS if fused_mlp_backward(cfg.dtype, cfg.d_ff) else 0
    x_ND, h_ND = LayerNorm(cfg.layer_norm_epsilon, dtype=cfg.dtype, name="ln2")(
        x_ND, residual=True, bias_columns=bias_columns)
    x_ND = x_ND + MLP(cfg, name="mlp")(h_ND, deterministic=deterministic)
    return x_ND.reshape(B, T, D)


class GPT(nn.Module):
  config: ModelConfig

  @nn.compact
  def __call__(self, tokens_BT, *, deterministic: bool = True, decode: bool = False,
               logits_dtype=jnp.float32, head: bool = True):
    """Logits (B, T, vocab_size) in `logits_dtype`. With `decode`, `tokens_BT` continue the
    sequences held in the mutable 'cache' collection (see init_cache) at its next free position,
    as Flax lm1b decodes. Without `head`, the tied output head's input and weight instead, both in
    the compute dtype: the final LayerNorm's output (B, T, d_model) and the token embedding
    (vocab_size, d_model), for a loss that applies the head itself (gptjax.step.head_loss)."""
    cfg = self.config
    T = tokens_BT.shape[1]
    wte = nn.Embed(cfg.vocab_size, cfg.d_model, embedding_init=_init(0.02), name="wte")
    wpe = nn.Embed(cfg.max_seq_len, cfg.d_model, embedding_init=_init(0.02), name="wpe")
    positions_T, cache_index = jnp.arange(T), None
    if decode:
      index = self.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))
      cache_index = index.value
      index.value = cache_index + T
      positions_T = cache_index + positions_T
    x_BTD = (wte(tokens_BT) + wpe(positions_T)[None]).astype(cfg.dtype)
    x_BTD = nn.Dropout(cfg.dropout)(x_BTD, deterministic=deterministic)
    block = nn.remat(Block, static_argnums=(2,)) if cfg.remat and not decode else Block
    for i in range(cfg.num_layers):
      x_BTD = block(cfg, name=f"block_{i}")(x_BTD, deterministic, cache_index)
    x_BTD = LayerNorm(cfg.layer_norm_epsilon, dtype=cfg.dtype, name="ln_f")(x_BTD)
    # Tied output head: the matmul runs in the compute dtype, the logits leave in `logits_dtype`.
    w_VD = wte.embedding.astype(cfg.dtype)
    if not head:
      return x_BTD, w_VD
    logits_BTV = x_BTD @ w_VD.T
    return logits_BTV.astype(logits_dtype)


def init_cache(config: ModelConfig, batch_size: int):
  """An empty decode cache for `batch_size` sequences: per block the keys and values
  (B, max_seq_len, heads, head_dim) in the compute dtype, and the next position (0)."""
  shapes = jax.eval_shape(lambda: GPT(config).init(
      jax.random.key(0), jnp.zeros((batch_size, 1), jnp.int32), decode=True))["cache"]
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def count_params(config: ModelConfig) -> int:
  """Parameter count from shapes alone (jax.eval_shape; nothing is allocated)."""
  model = GPT(config)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))
  return sum(math.prod(x.shape) for x in jax.tree.leaves(shapes))
