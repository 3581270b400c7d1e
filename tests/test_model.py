"""The GPT: shapes, causality, parameter counts of the presets."""
import dataclasses
import importlib.util
import os

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from gptjax.config import CONFIGS_DIR, TOKENIZER_VOCAB
from gptjax import model as model_lib, xla_flags
from gptjax.model import GPT, ModelConfig, count_params, gelu, padded_vocab_size

SMALL = ModelConfig(vocab_size=256, d_model=32, num_heads=4, num_layers=2, d_ff=64,
                    max_seq_len=16, dropout=0.0)


def _preset(name):
  spec = importlib.util.spec_from_file_location(name, os.path.join(CONFIGS_DIR, f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def test_gelu_and_its_gradient_match_jax():
  x = 4 * jax.random.normal(jax.random.key(0), (2, 3, 50))
  w = jax.random.normal(jax.random.key(1), x.shape)
  ref = lambda x: jnp.sum(jax.nn.gelu(x, approximate=True) * w)
  ours = lambda x: jnp.sum(gelu(x) * w)
  np.testing.assert_allclose(gelu(x), jax.nn.gelu(x, approximate=True), atol=1e-6)
  np.testing.assert_allclose(jax.grad(ours)(x), jax.grad(ref)(x), atol=1e-5)
  h = x.astype(jnp.bfloat16)
  assert gelu(h).dtype == jnp.bfloat16 and jax.grad(lambda h: jnp.sum(gelu(h)))(h).dtype == jnp.bfloat16


def _expression(fn, x):
  """fn's jaxpr on x as one nested expression, e.g. mul(x, add(1.0, x))."""
  jaxpr = jax.make_jaxpr(fn)(x).jaxpr
  made = {jaxpr.invars[0]: "x"}

  def name(v):
    return made[v] if not isinstance(v, jax.extend.core.Literal) else f"{float(v.val):.3g}"
  for eqn in jaxpr.eqns:
    made[eqn.outvars[0]] = (f"{eqn.primitive.name}("
                            + ", ".join(name(v) for v in eqn.invars) + ")")
  return made[jaxpr.outvars[0]]


def test_gelu_on_gpu_is_the_form_xla_fuses_into_the_matmul():
  # XLA's GemmRewriter turns x * 0.5 * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x*x*x))) on a cuBLASLt
  # matmul's output into its GELU epilogue only in this shape and in the matmul's own dtype: a
  # convert to float32 or another grouping of the products leaves a separate pass over memory.
  x = jnp.ones((4, 8), jnp.bfloat16)
  assert _expression(model_lib._gelu_tanh, x) == (
      "mul(x, mul(0.5, add(1, tanh(mul(0.797, add(x, mul(0.0447, mul(x, mul(x, x)))))))))")
  assert model_lib._gelu_tanh(x).dtype == jnp.bfloat16


@pytest.mark.parametrize("flags_on", [True, False])
def test_gelu_runs_in_bf16_only_where_xla_fuses_it(monkeypatch, request, flags_on):
  # On a GPU with gptjax.xla_flags' epilogue flags, gelu is the bf16 form that cuBLASLt computes
  # in float32; without them (a user's own XLA_FLAGS, or gptjax used as a library) it upcasts.
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  monkeypatch.setenv("XLA_FLAGS", " ".join(xla_flags.GPU_XLA_FLAGS) if flags_on
                     else "--xla_gpu_enable_cublaslt=true --xla_gpu_enable_triton_gemm=true")
  x = (4 * jax.random.normal(jax.random.key(0), (64, 50))).astype(jnp.bfloat16)
  jax.clear_caches()  # gelu's form is fixed when first traced: the process's flags never change
  request.addfinalizer(jax.clear_caches)
  (call,) = jax.make_jaxpr(gelu)(x).jaxpr.eqns
  prims = {e.primitive.name for e in call.params["call_jaxpr"].eqns}
  assert ("convert_element_type" in prims) != flags_on
  assert gelu(x).dtype == jnp.bfloat16
  np.testing.assert_allclose(gelu(x).astype(np.float32),
                             jax.nn.gelu(x.astype(jnp.float32), approximate=True),
                             rtol=0.05 if flags_on else 0.01, atol=0.02 if flags_on else 0.01)


def test_output_shape_and_dtype():
  model = GPT(SMALL)
  tokens = jnp.zeros((3, 16), jnp.int32)
  params = model.init(jax.random.key(0), tokens)
  logits = model.apply(params, tokens)
  assert logits.shape == (3, 16, 256)
  assert logits.dtype == jnp.float32


def test_bfloat16_compute_keeps_float32_params_and_logits():
  model = GPT(dataclasses.replace(SMALL, dtype=jnp.bfloat16))
  tokens = jnp.zeros((1, 16), jnp.int32)
  params = model.init(jax.random.key(0), tokens)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
  assert model.apply(params, tokens).dtype == jnp.float32


def test_remat_gives_the_same_loss_and_gradients():
  tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, 256)
  params = GPT(SMALL).init(jax.random.key(0), tokens)

  def loss(config):
    return jax.value_and_grad(lambda p: jnp.mean(GPT(config).apply(p, tokens) ** 2))(params)

  plain, remat = loss(SMALL), loss(dataclasses.replace(SMALL, remat=True))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), plain, remat)


def test_causal_no_gradient_from_future_tokens():
  """The loss at position t has zero gradient w.r.t. the embeddings of tokens after t."""
  model = GPT(SMALL)
  tokens = jax.random.randint(jax.random.key(1), (1, 16), 0, 256)
  params = model.init(jax.random.key(0), tokens)
  t = 6

  # Perturbing tokens after t never changes the logits at positions <= t.
  logits = model.apply(params, tokens)
  changed = tokens.at[0, t + 1:].set((tokens[0, t + 1:] + 7) % 256)
  logits2 = model.apply(params, changed)
  np.testing.assert_array_equal(np.asarray(logits[0, :t + 1]), np.asarray(logits2[0, :t + 1]))
  assert not np.allclose(logits[0, t + 1:], logits2[0, t + 1:])

  # And through gradients: d loss_t / d (position embedding of s) is zero for s > t.
  def loss_t(p):
    out = model.apply(p, tokens)
    return jax.nn.log_softmax(out[0, t])[tokens[0, t]]
  g = jax.grad(loss_t)(params)["params"]["wpe"]["embedding"]
  assert np.all(np.asarray(g[t + 1:]) == 0)
  assert np.any(np.asarray(g[:t + 1]) != 0)


@pytest.mark.parametrize("preset,low,high", [("tiny", 15e6, 17e6), ("small", 44e6, 50e6),
                                             ("medium", 117e6, 125e6)])
def test_preset_parameter_counts(preset, low, high):
  c = _preset(preset)
  n = count_params(ModelConfig(vocab_size=padded_vocab_size(TOKENIZER_VOCAB[c.tokenizer]),
                               d_model=c.d_model, num_heads=c.num_heads,
                               num_layers=c.num_layers, d_ff=c.d_ff, max_seq_len=c.max_seq_len))
  assert low <= n <= high


def test_presets_match_the_guide():
  table = {"tiny": (256, 4, 4, 1024, 256, "wikitext"),
           "small": (512, 8, 6, 2048, 512, "wikitext-103"),
           "medium": (768, 12, 12, 3072, 1024, "wikitext-103")}
  for name, want in table.items():
    c = _preset(name)
    assert (c.d_model, c.num_heads, c.num_layers, c.d_ff, c.max_seq_len, c.dataset) == want
