"""The GPT: shapes, causality, parameter counts of the presets."""
import dataclasses
import functools
import importlib.util
import os

import jax
import jax.extend.core
import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import pytest

from gptjax.config import CONFIGS_DIR, TOKENIZER_VOCAB
from gptjax import kernels, model as model_lib, step
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
  ours = lambda x: jnp.sum(gelu(x, False) * w)
  np.testing.assert_allclose(gelu(x, False), jax.nn.gelu(x, approximate=True), atol=1e-6)
  np.testing.assert_allclose(jax.grad(ours)(x), jax.grad(ref)(x), atol=1e-5)
  h = x.astype(jnp.bfloat16)
  assert gelu(h, False).dtype == jnp.bfloat16
  assert jax.grad(lambda h: jnp.sum(gelu(h, False)))(h).dtype == jnp.bfloat16


def test_bias_gelu_and_its_gradients_match_jax(monkeypatch):
  # Its backward pass is gptjax.kernels' Pallas kernel (here in Pallas' interpreter):
  # 7 row blocks of 2 rows, 3 column blocks of 32, the last ones partial.
  monkeypatch.setattr(kernels, "GELU_BLOCKS", (2, 2, 4, 1, 32))
  h = 4 * jax.random.normal(jax.random.key(0), (13, 80))
  b = jax.random.normal(jax.random.key(2), (80,))
  w = jax.random.normal(jax.random.key(1), h.shape)
  ref = lambda h, b: jnp.sum(jax.nn.gelu(h + b, approximate=True) * w)
  ours = lambda h, b: jnp.sum(model_lib.bias_gelu(h, b, False) * w)
  np.testing.assert_allclose(model_lib.bias_gelu(h, b, False), jax.nn.gelu(h + b, approximate=True),
                             atol=1e-6)
  jax.tree.map(lambda a, r: np.testing.assert_allclose(a, r, rtol=1e-5, atol=1e-5),
               jax.grad(ours, (0, 1))(h, b), jax.grad(ref, (0, 1))(h, b))
  hb, bb = h.astype(jnp.bfloat16), b.astype(jnp.bfloat16)
  grads = jax.grad(lambda h, b: jnp.sum(model_lib.bias_gelu(h, b, False)), (0, 1))(hb, bb)
  assert model_lib.bias_gelu(hb, bb, False).dtype == jnp.bfloat16
  assert [g.dtype for g in grads] == [jnp.bfloat16, jnp.bfloat16]


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
  assert _expression(kernels.gelu_tanh, x) == (
      "mul(x, mul(0.5, add(1, tanh(mul(0.797, add(x, mul(0.0447, mul(x, mul(x, x)))))))))")
  assert kernels.gelu_tanh(x).dtype == jnp.bfloat16


@pytest.mark.parametrize("epilogue", [True, False])
def test_gelu_runs_in_bf16_only_where_xla_fuses_it(epilogue):
  # With the plan's xla_gpu_epilogues, gelu is the bf16 form that cuBLASLt computes in float32;
  # without them it upcasts.
  x = (4 * jax.random.normal(jax.random.key(0), (64, 50))).astype(jnp.bfloat16)
  (call,) = jax.make_jaxpr(lambda x: gelu(x, epilogue))(x).jaxpr.eqns
  prims = {e.primitive.name for e in call.params["call_jaxpr"].eqns}
  assert ("convert_element_type" in prims) != epilogue
  assert gelu(x, epilogue).dtype == jnp.bfloat16
  np.testing.assert_allclose(gelu(x, epilogue).astype(np.float32),
                             jax.nn.gelu(x.astype(jnp.float32), approximate=True),
                             rtol=0.05 if epilogue else 0.01, atol=0.02 if epilogue else 0.01)


def _eqns(jaxpr):
  """Every equation of `jaxpr` and, recursively, of the jaxprs inside its equations."""
  yield from jaxpr.eqns
  for sub in jax.extend.core.subjaxprs(jaxpr):
    yield from _eqns(sub)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_qkv_projection_is_nn_dense_split_in_three(dtype):
  # q, k, v: nn.Dense(3D)'s parameters, values and gradients, from three matmuls on column slices
  # of the kernel, k and v without their biases (v's bias returned).
  x = jax.random.normal(jax.random.key(0), (2, 5, 12)).astype(dtype)
  qkv = model_lib.QKVDense(36, dtype=dtype, kernel_init=nn.initializers.normal(0.02))
  params = qkv.init(jax.random.key(1), x)
  dense = nn.Dense(36, dtype=dtype, kernel_init=nn.initializers.normal(0.02))
  assert jax.tree.map(np.shape, params) == jax.tree.map(np.shape, dense.init(
      jax.random.key(1), x))   # a checkpoint of either loads into the other
  params = jax.tree.map(lambda p: p + jax.random.normal(jax.random.key(2), p.shape), params)
  assert str(jax.make_jaxpr(qkv.apply)(params, x)).count("dot_general") == 3
  tol = dict(rtol=1e-5, atol=1e-5) if dtype == jnp.float32 else dict(rtol=2e-2, atol=5e-2)
  def ours(p, x):
    q, k, v, v_bias = qkv.apply(p, x)
    # the biases the matmuls left out, added back here
    return q, k + jnp.split(p["params"]["bias"], 3)[1].astype(dtype), v + v_bias.astype(dtype)

  split = lambda p, x: tuple(jnp.split(dense.apply(p, x), 3, axis=-1))
  for a, b in zip(ours(params, x), split(params, x)):
    np.testing.assert_allclose(a.astype(np.float32), b.astype(np.float32), **tol)
  # The gradients of the parameters and of x (three matmuls' contributions added).
  w = jax.random.normal(jax.random.key(3), (3, 2, 5, 12))
  loss = lambda f: lambda p, x: sum(jnp.sum(y.astype(jnp.float32) * w[i])
                                    for i, y in enumerate(f(p, x)))
  grads = jax.grad(loss(ours), (0, 1))(params, x)
  assert grads[1].dtype == dtype
  jax.tree.map(lambda a, b: np.testing.assert_allclose(
      a.astype(np.float32), b.astype(np.float32), **tol), grads,
      jax.grad(loss(split), (0, 1))(params, x))
  # x's gradient: each add's first operand a matmul's output (see qkv_matmuls)
  jaxpr = jax.make_jaxpr(jax.grad(loss(ours), 1))(params, x).jaxpr
  made_by = {v: eqn.primitive.name for eqn in _eqns(jaxpr) for v in eqn.outvars}
  adds = [eqn for eqn in _eqns(jaxpr) if eqn.primitive.name in ("add", "add_any")
          and all(getattr(v.aval, "shape", None) == x.shape for v in eqn.invars)]
  assert len(adds) == 2 and all(made_by[a.invars[0]] == "dot_general" for a in adds)


def _moved(params):
  """params, each leaf moved off its initial value (biases are 0 at init)."""
  leaves, treedef = jax.tree.flatten(params)
  return treedef.unflatten([p + 0.1 * jax.random.normal(jax.random.key(i), p.shape)
                            for i, p in enumerate(leaves)])


# The fused block with each of its paths: the plain XLA form, and the Pallas kernels (in Pallas'
# interpreter here) of the block (LayerNorm, the GELU backward) and of the loss, each alone and
# both together.
FUSED_FORMS = {"xla": {}, "block_kernels": dict(block_kernels=True),
               "loss_kernel": dict(loss_kernel=True),
               "all_kernels": dict(block_kernels=True, loss_kernel=True)}


@pytest.mark.parametrize("form", list(FUSED_FORMS))
def test_fused_block_matches_the_reference_block(form, monkeypatch):
  # The fused block (rows layout, q/k/v as three matmuls with k's bias left out and v's taken
  # into the projection, GELU recomputed backward) against GPT-2's plain block: the same
  # parameters, the same training loss and gradients, with dropout (the same masks from the same
  # rng) and a scaled loss (a cotangent other than 1). d_model 48 and d_ff 96 leave columns of
  # every kernel's blocks masked; the loss kernel takes each row of 256 logits in 4 blocks.
  monkeypatch.setattr(kernels, "DEFER_BLOCK", 64)
  config = dataclasses.replace(SMALL, d_model=48, d_ff=96, dropout=0.1)
  fused = dataclasses.replace(config, fused_block=True, **FUSED_FORMS[form])
  tokens = jax.random.randint(jax.random.key(1), (2, 17), 0, 256)
  params = GPT(config).init(jax.random.key(0), tokens[:, :-1])["params"]
  assert jax.tree.map(np.shape, params) == jax.tree.map(
      np.shape, GPT(fused).init(jax.random.key(0), tokens[:, :-1])["params"])
  params = _moved(params)

  def loss_and_grads(cfg):
    loss = lambda p: 0.3 * step.train_loss(GPT(cfg), p, tokens[:, :-1], tokens[:, 1:],
                                           rng=jax.random.key(2))
    return jax.value_and_grad(loss)(params)

  (ref_loss, ref_grads), (loss, grads) = loss_and_grads(config), loss_and_grads(fused)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  d = config.d_model
  for i in range(config.num_layers):
    # k's bias: no effect on the model; its gradient exactly 0 in the fused block (which leaves it
    # out), a rounding error's worth in the plain one.
    assert not np.any(grads[f"block_{i}"]["attn"]["qkv"]["bias"][d:2 * d])
    for g in (grads, ref_grads):
      assert np.all(g[f"block_{i}"]["attn"]["qkv"]["bias"][:d])
      g[f"block_{i}"]["attn"]["qkv"]["bias"] = g[f"block_{i}"]["attn"]["qkv"]["bias"].at[
          d:2 * d].set(0)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               grads, ref_grads)


@pytest.mark.parametrize("remat", [False, True])
def test_fused_block_in_bfloat16_and_with_remat_matches_the_reference(remat, monkeypatch):
  # With every kernel; the loss kernel's rows of 256 logits in 4 blocks.
  monkeypatch.setattr(kernels, "DEFER_BLOCK", 64)
  config = dataclasses.replace(SMALL, dtype=jnp.bfloat16, remat=remat)
  tokens = jax.random.randint(jax.random.key(1), (2, 17), 0, 256)
  params = _moved(GPT(config).init(jax.random.key(0), tokens[:, :-1])["params"])

  def loss_and_grads(cfg):
    loss = lambda p: step.train_loss(GPT(cfg), p, tokens[:, :-1], tokens[:, 1:])
    return jax.value_and_grad(loss)(params)

  (ref_loss, ref_grads) = loss_and_grads(config)
  (loss, grads) = loss_and_grads(dataclasses.replace(config, fused_block=True, **FUSED_FORMS[
      "all_kernels"]))
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-2)
  for path, a in jax.tree_util.tree_leaves_with_path(grads):   # bf16 rounds differently
    b = functools.reduce(lambda t, k: t[k.key], path, ref_grads)
    if "qkv" in jax.tree_util.keystr(path) and "bias" in jax.tree_util.keystr(path):
      a, b = a.at[32:64].set(0), b.at[32:64].set(0)   # k's bias: 0 in the fused block
    assert float(jnp.linalg.norm(a - b)) <= 0.05 * float(jnp.linalg.norm(b)) + 1e-6


@pytest.mark.parametrize("residual", [True, False], ids=["residual", "final"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("pallas", [False, True], ids=["xla", "pallas"])
def test_layer_norm_and_its_gradients_match_flax(dtype, pallas, residual, monkeypatch):
  # With the plan's block_kernels the fused block's LayerNorm runs gptjax.kernels' Pallas
  # kernels; here they run in Pallas' interpreter. 4 rows per block, 2 per program: 21 rows make 3
  # programs, the last one partial; rows of 48 in blocks of 64 columns. `residual`: as in a block,
  # where the residual stream continues from the x LayerNorm hands back (its gradient added in
  # the kernel); else as ln_f.
  monkeypatch.setattr(kernels, "LN_FWD_BLOCKS", (4, 2, 4, 1))
  monkeypatch.setattr(kernels, "LN_BWD_BLOCKS", (4, 2, 4, 1))
  k = jax.random.split(jax.random.key(0), 5)
  x = (3 * jax.random.normal(k[0], (3, 7, 48)) + 1).astype(dtype)
  params = {"scale": 1 + jax.random.normal(k[1], (48,)), "bias": jax.random.normal(k[2], (48,))}
  w_y, w_x = jax.random.normal(k[3], x.shape), jax.random.normal(k[4], x.shape)
  stream = lambda x: jnp.sum(jnp.sin(x.astype(jnp.float32)) * w_x)
  ln = model_lib.LayerNorm(dtype=dtype, kernel=pallas)

  def ours(x, params):
    out = ln.apply({"params": params}, x, residual=residual)
    x_out, y = out if residual else (x, out)
    return jnp.sum(y.astype(jnp.float32) * w_y) + stream(x_out)

  def flax_ln(x, params):
    y = nn.LayerNorm(dtype=dtype).apply({"params": params}, x)
    return jnp.sum(y.astype(jnp.float32) * w_y) + stream(x)

  y = ln.apply({"params": params}, x)
  assert y.dtype == dtype
  tol = dict(rtol=1e-5, atol=1e-5) if dtype == jnp.float32 else dict(rtol=0.02, atol=0.02)
  np.testing.assert_allclose(y.astype(np.float32), nn.LayerNorm(dtype=dtype).apply(
      {"params": params}, x).astype(np.float32), **tol)
  ours_grads, flax_grads = jax.grad(ours, (0, 1))(x, params), jax.grad(flax_ln, (0, 1))(x, params)
  assert ours_grads[0].dtype == dtype
  jax.tree.map(lambda a, b: np.testing.assert_allclose(
      a.astype(np.float32), b.astype(np.float32), **tol), ours_grads, flax_grads)


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


def test_gpu_kernels_lower_to_triton_for_cuda(monkeypatch):
  # Without a GPU: every Pallas kernel of the train step is lowered to Triton IR for CUDA
  # (jax.export for platform "cuda"), at the medium preset's shapes. This catches what Pallas'
  # interpreter accepts but its Triton lowering does not (block shapes, unsupported operations).
  monkeypatch.setattr(kernels, "_interpret", lambda: False)
  S = jax.ShapeDtypeStruct
  x, v = S((32, 1024, 768), jnp.bfloat16), S((768,), jnp.float32)
  h, b = S((32768, 3072), jnp.bfloat16), S((3072,), jnp.bfloat16)
  logits, targets = S((32, 1024, 50304), jnp.bfloat16), S((32, 1024), jnp.int32)

  def ln_grads(x, scale, bias, residual):
    def f(x, scale, bias):
      out = kernels.layer_norm(x, scale, bias, 1e-6, residual)
      x_out, y = out if residual else (x, out)
      return jnp.sum(y.astype(jnp.float32) ** 2) + jnp.sum(x_out.astype(jnp.float32))
    return jax.grad(f, (0, 1, 2))(x, scale, bias)

  def triton_calls(f, *args):
    exported = jax.export.export(jax.jit(f), platforms=["cuda"], disabled_checks=[
        jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(*args)
    return exported.mlir_module().count("stablehlo.custom_call @__gpu$xla.gpu.triton")

  assert triton_calls(lambda x, s, b: ln_grads(x, s, b, True), x, v, v) == 2   # forward, backward
  assert triton_calls(lambda x, s, b: ln_grads(x, s, b, False), x, v, v) == 2
  assert triton_calls(lambda h, b, d: jax.vjp(
      lambda h, b: model_lib.bias_gelu(h, b, True), h, b)[1](d), h, b, h) == 1
  x_ND, w_VD, targets_N = S((32768, 768), jnp.bfloat16), S((50304, 768), jnp.bfloat16), S(
      (32768,), jnp.int32)
  assert triton_calls(jax.value_and_grad(step.head_loss, (0, 1)), x_ND, w_VD, targets_N) == 1
  assert triton_calls(lambda x, t: jnp.sum(step.cross_entropy(x, t, kernel=True)),
                      logits, targets) == 1   # evaluation's logsumexp


def test_the_model_imports_no_data_or_tokenizer():
  import os
  import subprocess
  import sys
  from conftest import REPO
  code = ("import sys, gptjax.model; "
          "print(sorted(m for m in sys.modules if m == 'gptjax.data' or 'tiktoken' in m "
          "or m.startswith('datasets')))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                       check=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert out.stdout.strip() == "[]", out.stdout


def test_gptjax_modules_import_one_way():
  """The graph of every import between gptjax's modules (at the top or inside a function) has
  no circle."""
  import ast
  import glob
  import os
  from conftest import REPO
  graph = {}
  for path in glob.glob(os.path.join(REPO, "gptjax", "*.py")):
    name = os.path.basename(path)[:-3]
    deps = graph.setdefault(name, set())
    for node in ast.walk(ast.parse(open(path).read())):
      if isinstance(node, ast.ImportFrom) and node.module == "gptjax":
        deps.update(a.name for a in node.names)
      elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("gptjax."):
        deps.add(node.module.split(".")[1])
      elif isinstance(node, ast.Import):
        deps.update(a.name.split(".")[1] for a in node.names if a.name.startswith("gptjax."))
    deps.discard(name)

  def circle(node, path):
    if node in path:
      return path[path.index(node):] + [node]
    for dep in sorted(graph.get(node, ())):
      found = circle(dep, path + [node])
      if found:
        return found
    return None

  for name in sorted(graph):
    found = circle(name, [])
    assert found is None, " -> ".join(found)
