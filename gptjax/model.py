"""The GPT: a Flax linen decoder-only transformer and its frozen ModelConfig.

GPT-2 layout: token + learned position embeddings, pre-LN blocks (causal self-attention, GELU MLP),
a final LayerNorm and an output head tied to the token embedding. Parameters are float32; the
activations run in `dtype` (bfloat16 on accelerators); the logits are returned in float32 unless
the caller asks for another dtype (the training loss takes them in the compute dtype).

Two forms of the block compute the same function with the same parameters: `Block`, GPT-2's
block as a reader expects it, and `FusedBlock`, arranged for the GPU (rows layout, q/k/v as three
matmuls, biases moved where softmax makes them exact, GELU recomputed backward, Pallas kernels).
The config's execution plan (gptjax.plan, resolved once per run) chooses; nothing here reads the
backend, the device count or the environment. Nothing here knows about training.
"""
import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from gptjax import kernels


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
  # How it computes (gptjax.plan), not what: every combination is the same function.
  fused_block: bool = False    # FusedBlock, else Block
  block_kernels: bool = False  # FusedBlock's LayerNorms (and the final one) and GELU backward
                               # as Pallas kernels
  loss_kernel: bool = False    # the loss as Pallas kernels (gptjax.step)
  gelu_epilogue: bool = False  # FusedBlock's GELU in the compute dtype, as cuBLASLt fuses it


def padded_vocab_size(n_vocab: int, multiple: int = 128) -> int:
  return multiple * math.ceil(n_vocab / multiple)


def _init(std):
  return nn.initializers.normal(stddev=std)


def _residual_init(cfg: ModelConfig):
  """GPT-2's init of the projections into the residual stream, scaled by 1/sqrt(2 * layers)."""
  return _init(0.02 / math.sqrt(2 * cfg.num_layers))


class _Attention(nn.Module):
  """What both attention forms share: the heads and the decode cache."""
  config: ModelConfig

  def attend(self, q_BTNH, k_BTNH, v_BTNH, cache_index):
    if cache_index is None:
      return jax.nn.dot_product_attention(q_BTNH, k_BTNH, v_BTNH, is_causal=True,
                                          implementation=self.config.attention)
    k_BLNH, v_BLNH, mask_11TL = self._write_cache(k_BTNH, v_BTNH, cache_index)
    return jax.nn.dot_product_attention(q_BTNH, k_BLNH, v_BLNH, mask=mask_11TL,
                                        implementation="xla")

  def heads(self, y_BTD):
    B, T, D = y_BTD.shape
    return y_BTD.reshape(B, T, self.config.num_heads, D // self.config.num_heads)

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


# ---- The reference block: GPT-2's, in flax's own layers. -------------------------------------

class CausalSelfAttention(_Attention):

  @nn.compact
  def __call__(self, x_BTD, *, deterministic: bool, cache_index=None):
    cfg = self.config
    B, T, D = x_BTD.shape
    qkv_BTD = nn.Dense(3 * D, dtype=cfg.dtype, kernel_init=_init(0.02), name="qkv")(x_BTD)
    q_BTNH, k_BTNH, v_BTNH = map(self.heads, jnp.split(qkv_BTD, 3, axis=-1))
    y_BTD = self.attend(q_BTNH, k_BTNH, v_BTNH, cache_index).reshape(B, T, D)
    y_BTD = nn.Dense(D, dtype=cfg.dtype, name="proj", kernel_init=_residual_init(cfg))(y_BTD)
    return nn.Dropout(cfg.dropout)(y_BTD, deterministic=deterministic)


class MLP(nn.Module):
  config: ModelConfig

  @nn.compact
  def __call__(self, x_BTD, *, deterministic: bool):
    cfg = self.config
    h = nn.Dense(cfg.d_ff, dtype=cfg.dtype, kernel_init=_init(0.02), name="fc")(x_BTD)
    y = nn.Dense(cfg.d_model, dtype=cfg.dtype, name="proj", kernel_init=_residual_init(cfg))(
        nn.gelu(h, approximate=True))
    return nn.Dropout(cfg.dropout)(y, deterministic=deterministic)


class Block(nn.Module):
  """A pre-LN block: x + attn(ln1(x)), then x + mlp(ln2(x))."""
  config: ModelConfig

  @nn.compact
  def __call__(self, x_BTD, deterministic: bool, cache_index=None):
    cfg = self.config
    ln = functools.partial(nn.LayerNorm, cfg.layer_norm_epsilon, dtype=cfg.dtype)
    x_BTD = x_BTD + CausalSelfAttention(cfg, name="attn")(
        ln(name="ln1")(x_BTD), deterministic=deterministic, cache_index=cache_index)
    return x_BTD + MLP(cfg, name="mlp")(ln(name="ln2")(x_BTD), deterministic=deterministic)


# ---- The fused block: the same function and parameters, arranged for the GPU. ----------------

def _gelu_form(x, epilogue: bool):
  """jax.nn.gelu(x, approximate=True) in x's dtype. With `epilogue` (the plan's
  xla_gpu_epilogues) it is written in x's dtype and in exactly the form XLA's cuBLAS rewriter
  matches: applied to the output of a 2-D matmul plus bias (DenseGELU) it becomes that matmul's
  BIAS_GELU_AUX epilogue, computed in float32 on the accumulator. Without one it runs in float32
  (in bf16 element by element it would lose precision)."""
  if epilogue:
    return kernels.gelu_tanh(x)
  return kernels.gelu_tanh(x.astype(jnp.float32)).astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def gelu(x, epilogue: bool):
  """_gelu_form(x), with a backward pass that recomputes tanh from x (the MLP's saved
  pre-activation) behind an optimization barrier, so nothing else is saved: autodiff through
  jax.nn.gelu makes XLA keep an extra activation-sized intermediate of every MLP."""
  return _gelu_form(x, epilogue)


def _gelu_fwd(x, epilogue):
  return gelu(x, epilogue), x


def _gelu_bwd(epilogue, x, dy):
  del epilogue
  xf = jax.lax.optimization_barrier(x).astype(jnp.float32)  # recompute, don't share with fwd
  return ((dy.astype(jnp.float32) * kernels.gelu_tanh_grad(xf)).astype(x.dtype),)


gelu.defvjp(_gelu_fwd, _gelu_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def bias_gelu(h, bias, epilogue: bool):
  """gelu(h + bias), whose backward pass is gptjax.kernels.bias_gelu_grad's Pallas kernel: d(h)
  and d(bias) in one pass over the saved pre-activation h + bias (which the matmul's GELU epilogue
  writes anyway) and d(y)."""
  return _bias_gelu_fwd(h, bias, epilogue)[0]


def _bias_gelu_fwd(h, bias, epilogue):
  x = h + bias
  return _gelu_form(x, epilogue), (x, bias)


def _bias_gelu_bwd(epilogue, saved, dy):
  del epilogue
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
  epilogue: bool = False
  kernel: bool = False   # the backward pass as bias_gelu's Pallas kernel

  @nn.compact
  def __call__(self, x_NK):
    x_NK, kernel, bias = self.promoted(x_NK)
    h_NF = x_NK @ kernel
    if self.kernel:
      return bias_gelu(h_NF, bias, self.epilogue)
    # The bias add's own autodiff: XLA fuses its gradient into gelu's backward pass (reduced
    # inside a custom VJP, XLA made it a separate, slower pass: bench/HISTORY.md).
    return gelu(h_NF + bias, self.epilogue)


class LayerNorm(nn.LayerNorm):
  """flax.linen.LayerNorm (its parameters and options), or, with `kernel`, gptjax.kernels' Pallas
  kernels.

  With `residual=True` it returns (x, LayerNorm(x)), and the caller continues the residual stream
  from that x: the kernels' backward pass then adds the stream's gradient into d(x) as it writes
  it, instead of XLA adding it in another pass over the activations.
  """
  kernel: bool = False

  @nn.compact
  def __call__(self, x, residual: bool = False):
    if not self.kernel:
      y = super().__call__(x)
      return (x, y) if residual else y
    features = (x.shape[-1],)
    scale = self.param("scale", self.scale_init, features, self.param_dtype)
    bias = self.param("bias", self.bias_init, features, self.param_dtype)
    out = kernels.layer_norm(x, scale, bias, self.epsilon, residual)
    x, y = out if residual else (x, out)
    y = y.astype(self.dtype or x.dtype)
    return (x, y) if residual else y


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
  """q, k and v for attention, with nn.Dense(features = 3 * d)'s parameters, as three matmuls on
  column slices of the kernel, so that q, k and v each leave their own matmul contiguous, as
  cuDNN's attention takes them; slicing one (B, T, 3D) output copies them, and their gradients
  are concatenated (bench/HISTORY.md). XLA's dot merger would merge the three back: the plan turns
  it off where the fused block runs on a GPU (gptjax.plan).

  The three matmuls leave k and v without their biases, which attention does not need where they
  are: k's bias adds q . b_k to all of a query's scores alike, which softmax cancels, so its
  gradient is 0; v's bias reaches every output row whole (the attention weights sum to 1), so it
  is returned as v_bias for the output projection to take into its own bias
  (_Dense.promoted's input_bias). Returns (q, k, v, v_bias)."""

  @nn.compact
  def __call__(self, x):
    kernel, bias = self.declared(x.shape[-1])
    x_c, kernel_c, bias_c = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    d = self.features // 3
    return (*qkv_matmuls(x_c, kernel_c, bias_c[:d]), bias[2 * d:])


class FusedAttention(_Attention):
  """CausalSelfAttention's function; returns the output projection as rows (B*T, D), the layout
  in which FusedBlock adds it to the residual stream.

  The projection takes v's bias (QKVDense): exact because every query sees at least one key
  (causal, and the decode mask keeps each query's own position) and the attention weights are not
  dropped out, so each row's weights sum to 1."""

  @nn.compact
  def __call__(self, x_BTD, *, deterministic: bool, cache_index=None):
    cfg = self.config
    B, T, D = x_BTD.shape
    *qkv, v_bias = QKVDense(3 * D, dtype=cfg.dtype, kernel_init=_init(0.02), name="qkv")(x_BTD)
    y_BTNH = self.attend(*map(self.heads, qkv), cache_index)
    y_ND = Dense(D, dtype=cfg.dtype, name="proj", kernel_init=_residual_init(cfg))(
        y_BTNH.reshape(B * T, D), input_bias=v_bias)
    return nn.Dropout(cfg.dropout)(y_ND, deterministic=deterministic)


class FusedMLP(nn.Module):
  """MLP's function on rows (B*T, D)."""
  config: ModelConfig

  @nn.compact
  def __call__(self, x_ND, *, deterministic: bool):
    cfg = self.config
    h_NF = DenseGELU(cfg.d_ff, dtype=cfg.dtype, kernel_init=_init(0.02), name="fc",
                     epilogue=cfg.gelu_epilogue, kernel=cfg.block_kernels)(x_ND)
    y_ND = nn.Dense(cfg.d_model, dtype=cfg.dtype, name="proj",
                    kernel_init=_residual_init(cfg))(h_NF)
    return nn.Dropout(cfg.dropout)(y_ND, deterministic=deterministic)


def check_fused(cfg) -> None:
  """The fused block's maths hold for this architecture only: k's bias dropped and v's moved into
  the projection need every attention row's weights to sum to 1 (no dropout on them, no mask that
  leaves a query without keys), and the rows layout assumes positions enter once, at the
  embedding (learned, not rotary). A config that grows such a variant must run Block."""
  assert not getattr(cfg, "attention_dropout", 0.0), "FusedBlock: attention dropout"
  assert getattr(cfg, "positions", "learned") == "learned", "FusedBlock: non-learned positions"


class FusedBlock(nn.Module):
  """Block's function and parameters. Inside it the residual stream is rows (B*T, D): each
  residual add then takes the stream itself, which the LayerNorms use too, and XLA fuses the add
  into the projection's matmul as its C input, written out of place. Added through a (B, T, D)
  reshape, the stream reached the add as a view of no other use: XLA wrote the matmul over it in
  place and so had to copy the stream first (24 copies per step of the medium preset)."""
  config: ModelConfig

  @nn.compact
  def __call__(self, x_BTD, deterministic: bool, cache_index=None):
    cfg = self.config
    check_fused(cfg)
    B, T, D = x_BTD.shape
    ln = functools.partial(LayerNorm, cfg.layer_norm_epsilon, dtype=cfg.dtype,
                           kernel=cfg.block_kernels)
    x_ND, h_ND = ln(name="ln1")(x_BTD.reshape(B * T, D), residual=True)
    x_ND = x_ND + FusedAttention(cfg, name="attn")(
        h_ND.reshape(B, T, D), deterministic=deterministic, cache_index=cache_index)
    x_ND, h_ND = ln(name="ln2")(x_ND, residual=True)
    x_ND = x_ND + FusedMLP(cfg, name="mlp")(h_ND, deterministic=deterministic)
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
    block = FusedBlock if cfg.fused_block else Block
    block = nn.remat(block, static_argnums=(2,)) if cfg.remat and not decode else block
    for i in range(cfg.num_layers):
      x_BTD = block(cfg, name=f"block_{i}")(x_BTD, deterministic, cache_index)
    x_BTD = LayerNorm(cfg.layer_norm_epsilon, dtype=cfg.dtype, kernel=cfg.block_kernels,
                      name="ln_f")(x_BTD)
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
