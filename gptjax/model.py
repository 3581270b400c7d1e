"""The GPT: a Flax linen decoder-only transformer and its frozen ModelConfig.

GPT-2 layout: token + learned position embeddings, pre-LN blocks (causal self-attention, GELU MLP),
a final LayerNorm and an output head tied to the token embedding. Parameters are float32; the
activations run in `dtype` (bfloat16 on accelerators); the logits are returned in float32.
Nothing here knows about training.
"""
import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp


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


def padded_vocab_size(n_vocab: int, multiple: int = 128) -> int:
  return multiple * math.ceil(n_vocab / multiple)


def _init(std):
  return nn.initializers.normal(stddev=std)


class CausalSelfAttention(nn.Module):
  config: ModelConfig

  @nn.compact
  def __call__(self, x_BTD, *, deterministic: bool):
    cfg = self.config
    head_dim = cfg.d_model // cfg.num_heads
    B, T, D = x_BTD.shape
    qkv_BT3D = nn.Dense(3 * D, dtype=cfg.dtype, kernel_init=_init(0.02), name="qkv")(x_BTD)
    q_BTNH, k_BTNH, v_BTNH = jnp.split(qkv_BT3D.reshape(B, T, 3 * cfg.num_heads, head_dim), 3,
                                       axis=2)
    y_BTNH = jax.nn.dot_product_attention(q_BTNH, k_BTNH, v_BTNH, is_causal=True,
                                          implementation=cfg.attention)
    # GPT-2: residual projections scaled by 1/sqrt(2 * num_layers).
    y_BTD = nn.Dense(D, dtype=cfg.dtype, name="proj",
                     kernel_init=_init(0.02 / math.sqrt(2 * cfg.num_layers)))(y_BTNH.reshape(B, T, D))
    return nn.Dropout(cfg.dropout)(y_BTD, deterministic=deterministic)


class MLP(nn.Module):
  config: ModelConfig

  @nn.compact
  def __call__(self, x_BTD, *, deterministic: bool):
    cfg = self.config
    h_BTF = nn.Dense(cfg.d_ff, dtype=cfg.dtype, kernel_init=_init(0.02), name="fc")(x_BTD)
    h_BTF = nn.gelu(h_BTF, approximate=True)
    y_BTD = nn.Dense(cfg.d_model, dtype=cfg.dtype, name="proj",
                     kernel_init=_init(0.02 / math.sqrt(2 * cfg.num_layers)))(h_BTF)
    return nn.Dropout(cfg.dropout)(y_BTD, deterministic=deterministic)


class Block(nn.Module):
  config: ModelConfig

  @nn.compact
  def __call__(self, x_BTD, deterministic: bool):
    cfg = self.config
    x_BTD = x_BTD + CausalSelfAttention(cfg, name="attn")(
        nn.LayerNorm(dtype=cfg.dtype, name="ln1")(x_BTD), deterministic=deterministic)
    x_BTD = x_BTD + MLP(cfg, name="mlp")(
        nn.LayerNorm(dtype=cfg.dtype, name="ln2")(x_BTD), deterministic=deterministic)
    return x_BTD


class GPT(nn.Module):
  config: ModelConfig

  @nn.compact
  def __call__(self, tokens_BT, *, deterministic: bool = True):
    cfg = self.config
    T = tokens_BT.shape[1]
    wte = nn.Embed(cfg.vocab_size, cfg.d_model, embedding_init=_init(0.02), name="wte")
    wpe = nn.Embed(cfg.max_seq_len, cfg.d_model, embedding_init=_init(0.02), name="wpe")
    x_BTD = (wte(tokens_BT) + wpe(jnp.arange(T))[None]).astype(cfg.dtype)
    x_BTD = nn.Dropout(cfg.dropout)(x_BTD, deterministic=deterministic)
    block = nn.remat(Block, static_argnums=(2,)) if cfg.remat else Block
    for i in range(cfg.num_layers):
      x_BTD = block(cfg, name=f"block_{i}")(x_BTD, deterministic)
    x_BTD = nn.LayerNorm(dtype=cfg.dtype, name="ln_f")(x_BTD)
    # Tied output head: the matmul runs in the compute dtype, the logits leave in float32.
    logits_BTV = x_BTD @ wte.embedding.astype(cfg.dtype).T
    return logits_BTV.astype(jnp.float32)


def count_params(config: ModelConfig) -> int:
  """Parameter count from shapes alone (jax.eval_shape; nothing is allocated)."""
  model = GPT(config)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))
  return sum(math.prod(x.shape) for x in jax.tree.leaves(shapes))
