"""Times the MLP's input-gradient matmul with the GELU backward: XLA's matmul followed by the Pallas
GELU-backward kernel (gptjax.kernels.bias_gelu_grad) against one cuBLASLt matmul with the
DGELU_BGRAD epilogue (gptjax.cublaslt.dgelu_bgrad), for each of cuBLASLt's first algorithms.

    python bench/mlp_backward.py                   # medium, batch 32: 32768 rows, d 768, ff 3072
    python bench/mlp_backward.py --rows 131072     # batch 128

Prints ms per call (median of 3 windows) and each result's largest difference from float32
arithmetic (gptjax.cublaslt.dgelu_bgrad_reference computed in float32), relative to the result's
largest magnitude. Needs a CUDA GPU for all but the reference.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from gptjax import xla_flags  # noqa: E402

xla_flags.set_defaults()   # the step's cuBLASLt flags, before jax touches a device

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from block_kernels import _max_diff, print_problem, shape_parser  # noqa: E402
from gptjax import cublaslt, kernels  # noqa: E402
from loss_kernels import time_ms  # noqa: E402


def main(argv=None):
  p = shape_parser(__doc__.splitlines()[0])
  p.add_argument("--algos", type=int, default=4, help="cuBLASLt heuristic ranks to time")
  args = p.parse_args(argv)
  print_problem(args)
  k = jax.random.split(jax.random.key(0), 3)
  dy = jax.random.normal(k[0], (args.rows, args.d)).astype(jnp.bfloat16)
  w = (0.02 * jax.random.normal(k[1], (args.d, args.ff))).astype(jnp.bfloat16)
  pre = (2 * jax.random.normal(k[2], (args.rows, args.ff))).astype(jnp.bfloat16)
  f32 = lambda a: a.astype(jnp.float32)
  ref = jax.jit(cublaslt.dgelu_bgrad_reference)(f32(dy), f32(w), f32(pre))
  flops = 2 * args.rows * args.d * args.ff
  results = {}

  def report(label, fn):
    try:
      ms, out = time_ms(fn, dy, w, pre, n=args.calls)
    except Exception as e:  # noqa: BLE001  (an algorithm cuBLASLt refuses: say so, go on)
      print(f"{label:44s} failed: {str(e).splitlines()[0][:120]}", flush=True)
      return
    results[label] = (ms, _max_diff(out, ref))
    print(f"{label:44s} {ms:8.3f} ms  {flops / ms / 1e9:6.1f} TFLOP/s  max relative difference "
          f"{results[label][1]:.2e}", flush=True)

  report("matmul alone (XLA; its difference: not the same result)",
         lambda dy, w, pre: (dy @ w, jnp.sum(w, axis=0)))
  report("matmul + GELU backward, XLA", cublaslt.dgelu_bgrad_reference)
  if kernels.enabled():
    report("matmul (XLA) + GELU backward (Pallas)",
           lambda dy, w, pre: kernels.bias_gelu_grad(pre, dy @ w))
  if cublaslt.available():
    for rank in range(args.algos):
      report(f"cuBLASLt DGELU_BGRAD, algorithm {rank}",
             lambda dy, w, pre, rank=rank: cublaslt.dgelu_bgrad(dy, w, pre, algo_rank=rank,
                                                                bias_grad=True))
    for rank in range(args.algos):
      report(f"cuBLASLt DGELU, algorithm {rank}, XLA's bias sum",
             lambda dy, w, pre, rank=rank: cublaslt.dgelu_bgrad(dy, w, pre, algo_rank=rank,
                                                                bias_grad=False))
  return results


if __name__ == "__main__":
  main()
