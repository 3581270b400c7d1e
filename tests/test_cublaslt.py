"""gptjax.cublaslt: the DGELU-epilogue extension's source, its reference arithmetic, its switch.
(The op itself needs a CUDA GPU: bench/mlp_backward.py checks it there against float32.)"""
import shutil
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptjax import cublaslt


def test_extension_source_compiles_against_this_jaxlibs_ffi_headers(tmp_path):
  cxx = shutil.which("g++") or shutil.which("c++")
  if cxx is None:
    pytest.skip("no C++ compiler here")
  out = tmp_path / "dgelu_bgrad.o"
  done = subprocess.run(cublaslt.compile_command(cxx, str(out)), capture_output=True, text=True)
  assert done.returncode == 0, done.stderr[-2000:]
  nm = shutil.which("nm")
  if nm:   # the handler XLA is given, exported under the name cublaslt.py loads
    symbols = subprocess.run([nm, str(out)], capture_output=True, text=True).stdout
    assert " T GptjaxDgeluBgrad" in symbols


def test_reference_is_the_gelu_backward_of_the_matmul():
  k = jax.random.split(jax.random.key(0), 3)
  dy = jax.random.normal(k[0], (13, 24))
  w = jax.random.normal(k[1], (24, 40))
  pre = 3 * jax.random.normal(k[2], (13, 40))
  d_pre, d_bias = cublaslt.dgelu_bgrad_reference(dy, w, pre)
  # d/dpre of sum(gelu(pre) * (dy @ w)): jax's own derivative of its tanh GELU
  want = jax.grad(lambda p: jnp.sum(jax.nn.gelu(p, approximate=True) * (dy @ w)))(pre)
  np.testing.assert_allclose(d_pre, want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(d_bias, want.sum(0), rtol=1e-5, atol=1e-4)
  assert d_pre.dtype == pre.dtype and d_bias.dtype == jnp.float32


def test_op_shapes_and_dtypes():
  # The custom call's declared results, as XLA sees them (abstract evaluation: no GPU needed).
  S = jax.ShapeDtypeStruct
  dy, w, pre = S((40, 48), jnp.bfloat16), S((48, 96), jnp.bfloat16), S((40, 96), jnp.bfloat16)
  for bias_grad in (False, True):
    d_pre, d_bias = jax.eval_shape(
        lambda *a: cublaslt.dgelu_bgrad(*a, bias_grad=bias_grad), dy, w, pre)
    assert (d_pre.shape, d_pre.dtype, d_bias.shape, d_bias.dtype) == (
        (40, 96), jnp.bfloat16, (96,), jnp.float32)


def test_applies_only_to_bf16_and_widths_cublaslt_takes(monkeypatch):
  monkeypatch.setattr(cublaslt, "available", lambda: True)
  assert cublaslt.applies(jnp.bfloat16, 3072)
  assert not cublaslt.applies(jnp.float32, 3072)
  assert not cublaslt.applies(jnp.bfloat16, 100)   # the pre-activation's leading dimension


def test_not_available_without_a_gpu_or_when_turned_off(monkeypatch):
  if jax.default_backend() != "cpu":
    pytest.skip("checks the CPU answer")
  cublaslt.available.cache_clear()
  try:
    assert not cublaslt.available()
    cublaslt.available.cache_clear()
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setenv("GPTJAX_CUBLASLT", "0")
    assert not cublaslt.available()   # turned off: not even built
  finally:
    cublaslt.available.cache_clear()
