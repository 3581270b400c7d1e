"""cuBLASLt's DGELU matmul epilogue as a JAX op, for the MLP's backward pass on one GPU.

d_pre = (dy @ w) * gelu'(pre) in one cuBLASLt matmul whose epilogue reads the saved
pre-activation, and d_bias = d_pre summed over rows by XLA: XLA has no such epilogue, and without
it d(h) = dy @ w is written out and read back by a separate GELU-backward pass (bench/HISTORY.md,
item 44).

The op is an XLA FFI custom call (gptjax/csrc/dgelu_bgrad.cc), compiled with the host's C++
compiler against JAX's FFI headers and linked to the libcublasLt that JAX's CUDA wheels install,
the first time a process asks for it, and cached beside the tokenized splits ($GPTJAX_CACHE, else
~/.cache/gptjax). Where that fails (no compiler, no libcublasLt, no GPU, a result that disagrees
with XLA on a small check) `available()` is False, the log says why, and the model keeps its
Pallas GELU kernel; GPTJAX_CUBLASLT=0 turns it off. `dgelu_bgrad_reference` is the same arithmetic in XLA, for tests
and for any platform.
"""
import ctypes
import functools
import glob
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from gptjax import kernels

TARGET = "gptjax_dgelu_bgrad"
WORKSPACE_BYTES = 32 << 20   # cuBLASLt's recommended workspace on Hopper
_SOURCE = os.path.join(os.path.dirname(__file__), "csrc", "dgelu_bgrad.cc")
log = logging.getLogger(__name__)


def _cublaslt_library():
  """The libcublasLt to link: the file this process has loaded (JAX's GPU backend loads it), else
  one from JAX's nvidia wheels or a CUDA toolkit; None if there is none."""
  try:
    with open("/proc/self/maps", errors="replace") as f:
      loaded = next((line.split()[-1] for line in f if "libcublasLt.so" in line), None)
    if loaded:
      return loaded
  except OSError:
    pass
  roots = [os.path.join(p, "nvidia") for p in sys.path if os.path.isdir(os.path.join(p, "nvidia"))]
  found = sorted(lib for r in roots
                 for lib in glob.glob(os.path.join(r, "**", "libcublasLt.so.*"), recursive=True))
  found += sorted(glob.glob("/usr/local/cuda*/lib64/libcublasLt.so.*"))
  return found[0] if found else None


def compile_command(cxx: str, output: str, lib=None) -> list:
  """The compiler's command line: the source against JAX's FFI headers (no CUDA headers: the
  source declares the cuBLASLt functions it calls), linked to `lib` when given."""
  cmd = [cxx, _SOURCE, "-o", output, "-O2", "-std=c++17", "-fPIC", "-w", "-I", jax.ffi.include_dir()]
  if lib is None:
    return cmd + ["-c"]
  return cmd + ["-shared", "-Wl,--no-undefined", "-L", os.path.dirname(lib),
                "-l:" + os.path.basename(lib), "-Wl,-rpath," + os.path.dirname(lib)]


def _build() -> str:
  """Path of the compiled library, built if not cached; raises RuntimeError saying what is missing."""
  cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
  if not cxx:
    raise RuntimeError("no C++ compiler (set CXX or install g++)")
  lib = _cublaslt_library()
  if not lib:
    raise RuntimeError("no libcublasLt (JAX's CUDA wheels install it: nvidia-cublas-*)")
  with open(_SOURCE, "rb") as f:
    source = f.read()
  cmd = compile_command(cxx, "OUT", lib)
  digest = hashlib.sha256(source + repr((cmd, jax.__version__)).encode()).hexdigest()[:16]
  from gptjax import data  # here: importing the model must not import the data pipeline
  cache = data.default_cache_dir()
  path = os.path.join(cache, f"dgelu_bgrad-{digest}.so")
  if not os.path.exists(path):
    os.makedirs(cache, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)
    os.close(fd)
    try:
      done = subprocess.run(compile_command(cxx, tmp, lib), capture_output=True)
      if done.returncode:
        stderr = done.stderr.decode(errors="replace").strip()
        raise RuntimeError(f"{cxx} failed: {stderr[-500:]}")
      os.chmod(tmp, 0o644)   # mkstemp's 0600 would keep a shared cache's other users out
      os.replace(tmp, path)   # whole or not at all, for processes building side by side
    finally:
      if os.path.exists(tmp):
        os.unlink(tmp)
  return path


def _works() -> bool:
  """Whether the op agrees with dgelu_bgrad_reference on a small problem (cuBLASLt's refusal of
  the problem arrives as an exception)."""
  k = jax.random.split(jax.random.key(0), 3)
  dy, w, pre = (jax.random.normal(key, shape).astype(jnp.bfloat16)
                for key, shape in zip(k, [(256, 64), (64, 128), (256, 128)]))
  got = jax.block_until_ready(jax.jit(dgelu_bgrad)(dy, w, pre))
  want = dgelu_bgrad_reference(*(a.astype(jnp.float32) for a in (dy, w, pre)))
  return all(bool(jnp.allclose(g.astype(jnp.float32), r, rtol=0.03, atol=0.03 * jnp.max(jnp.abs(r))))
             for g, r in zip(got, want))


@functools.cache
def available() -> bool:
  """Whether dgelu_bgrad runs here: a CUDA GPU, GPTJAX_CUBLASLT not 0, the library built and
  its result checked on a small problem."""
  if os.environ.get("GPTJAX_CUBLASLT", "1") == "0" or jax.default_backend() != "gpu":
    return False
  path = None
  try:
    path = _build()
    lib = ctypes.cdll.LoadLibrary(path)
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.GptjaxDgeluBgrad), platform="CUDA")
    with jax.ensure_compile_time_eval():   # run now, also when first asked while tracing
      if _works():
        return True
    why = "its result disagrees with XLA's"
  except Exception as e:  # noqa: BLE001  (whatever fails here, training goes on without it)
    if isinstance(e, OSError) and path and os.path.exists(path):
      os.unlink(path)   # a library that does not load is not kept for the next process
    why = str(e)
  log.warning("gptjax: cuBLASLt's DGELU epilogue is not available (%s); the MLP's backward pass "
              "uses the Pallas GELU kernel instead", why)
  return False


def applies(dtype, d_ff: int) -> bool:
  """Whether dgelu_bgrad can run an MLP of width d_ff computing in dtype: bf16, d_ff a multiple
  of 8 (cuBLASLt's rule for the pre-activation's leading dimension), available()."""
  return jnp.dtype(dtype) == jnp.bfloat16 and d_ff % 8 == 0 and available()


def dgelu_bgrad(dy_ND, w_DF, pre_NF, algo_rank: int = 0, bias_grad: bool = False):
  """(d_pre (N, F) bf16, d_bias (F,) float32): (dy @ w) * gelu'(pre) and its column sums.

  d_pre comes from one cuBLASLt matmul with the DGELU epilogue; d_bias is XLA's reduction of it
  (available() must be True). With `bias_grad`, cuBLASLt's DGELU_BGRAD epilogue computes d_bias
  too (in bf16, the output's type): slower (bench/HISTORY.md, item 44), kept for
  bench/mlp_backward.py. All three inputs bf16; `algo_rank` picks the heuristic's n-th algorithm
  (0: its first choice)."""
  n, f = pre_NF.shape
  call = jax.ffi.ffi_call(TARGET, (jax.ShapeDtypeStruct((n, f), pre_NF.dtype),
                                   jax.ShapeDtypeStruct((f,), pre_NF.dtype),
                                   jax.ShapeDtypeStruct((WORKSPACE_BYTES,), jnp.uint8)))
  d_pre, d_bias, _ = call(dy_ND, w_DF, pre_NF, algo_rank=np.int64(algo_rank),
                          bias_grad=np.int64(bias_grad))
  if bias_grad:
    return d_pre, d_bias.astype(jnp.float32)
  return d_pre, jnp.sum(d_pre.astype(jnp.float32), axis=0)


def dgelu_bgrad_reference(dy_ND, w_DF, pre_NF):
  """dgelu_bgrad's arithmetic in XLA: the matmul in float32 accumulation, gelu' in float32."""
  dh = jnp.dot(dy_ND, w_DF, preferred_element_type=jnp.float32)
  d_pre = dh * kernels.gelu_tanh_grad(pre_NF.astype(jnp.float32))
  return d_pre.astype(pre_NF.dtype), jnp.sum(d_pre, axis=0)
