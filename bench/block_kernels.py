"""Times the transformer block's memory-bound passes, XLA against gptjax.kernels' Pallas kernels:
LayerNorm forward and backward (with the residual stream's gradient), and the MLP's GELU backward
(with the bias gradient); optionally over a sweep of the kernels' block settings.

    python bench/block_kernels.py                      # medium, batch 32: 32768 rows, d 768, ff 3072
    python bench/block_kernels.py --sweep              # every block setting in *_SWEEP
    python bench/block_kernels.py --rows 64 --d 48 --ff 96   # a quick check (CPU: interpreter)

Prints ms per call (median of 3 windows), the memory bandwidth its minimal traffic implies
(LayerNorm forward: read x, write y; backward: read x, d(y) and the residual gradient, write d(x);
GELU backward: read x and d(y), write d(x)) and the largest difference from XLA's result, relative to the result's largest magnitude. A
backward pass is timed alone, its forward pass run beforehand. Ends with the fastest setting of
each pass.
"""
import argparse
import itertools
import os
import sys
from unittest import mock

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from gptjax import kernels, model  # noqa: E402
from loss_kernels import time_ms  # noqa: E402

# Settings as gptjax.kernels.LN_FWD_BLOCKS / LN_BWD_BLOCKS / GELU_BLOCKS.
LN_SWEEP = list(itertools.product((1, 2, 4, 8), (8, 16), (2, 4, 8), (1, 3)))
GELU_SWEEP = list(itertools.product((2, 4, 8), (4, 8, 16), (4, 8), (1,), (512, 1024)))


def _pullback(vjp, cotangent):
  return vjp(cotangent)


def _backward(f, primals, cotangent):
  """(function, arguments) that time f's backward pass alone: the forward pass runs once, here,
  and its saved values reach the timed function as arguments (jax.vjp's function is a pytree)."""
  _, vjp = jax.vjp(f, *primals)
  return _pullback, (vjp, cotangent)


def _flat(made):
  fn, fargs = made
  return (fn, *fargs)


def _max_diff(a, b):
  """The largest difference between a and b over each output, relative to that output's largest
  magnitude (bf16 outputs differ by their rounding: 2^-8 = 0.4% of the value, per step)."""
  return max(float(jnp.max(jnp.abs(x.astype(jnp.float32) - y.astype(jnp.float32)))
                   / jnp.max(jnp.abs(y.astype(jnp.float32))))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def shape_parser(description: str) -> argparse.ArgumentParser:
  """The block-level benchmarks' common options: the problem's rows, d, ff and the calls per
  timed window (medium, batch 32 by default)."""
  p = argparse.ArgumentParser(description=description)
  p.add_argument("--rows", type=int, default=32768)
  p.add_argument("--d", type=int, default=768)
  p.add_argument("--ff", type=int, default=3072)
  p.add_argument("--calls", type=int, default=20, help="calls per timed window")
  return p


def print_problem(args) -> None:
  print(f"{jax.devices()[0].device_kind}: {args.rows} rows, d {args.d}, ff {args.ff}, bf16")


def main(argv=None):
  p = shape_parser(__doc__.splitlines()[0])
  p.add_argument("--sweep", action="store_true", help="time every block setting in *_SWEEP")
  args = p.parse_args(argv)
  print_problem(args)
  k = jax.random.split(jax.random.key(0), 8)
  x, dy, dres = ((3 * jax.random.normal(key, (args.rows, args.d))).astype(jnp.bfloat16)
                 for key in k[:3])
  h, dh = ((3 * jax.random.normal(key, (args.rows, args.ff))).astype(jnp.bfloat16)
           for key in k[3:5])
  bias = jax.random.normal(k[5], (args.ff,)).astype(jnp.bfloat16)
  params = {"params": {"scale": 1 + jax.random.normal(k[6], (args.d,)),
                       "bias": jax.random.normal(k[7], (args.d,))}}

  # Each pass: pallas -> (function, arguments) to time, built under the kernels' current
  # settings; pallas as the plan's block_kernels.
  def ln_fwd(pallas):
    ln = model.LayerNorm(dtype=jnp.bfloat16, kernel=pallas)
    return (lambda x, params: ln.apply(params, x)), (x, params)

  def ln_bwd(pallas):   # what the step's backward pass computes for one LayerNorm
    ln = model.LayerNorm(dtype=jnp.bfloat16, kernel=pallas)
    return _backward(lambda x, p: ln.apply(p, x, residual=True), (x, params), (dres, dy))

  def gelu_bwd(pallas):   # the MLP's GELU as DenseGELU runs it on a GPU (cuBLASLt epilogue form)
    f = ((lambda h, b: model.bias_gelu(h, b, True)) if pallas else
         (lambda h, b: model.gelu(h + b, True)))
    return _backward(f, (h, bias), dh)

  mb = lambda *arrays: sum(a.size * a.dtype.itemsize for a in arrays) / 1e9
  passes = [  # name, pass, GB moved, kernels' setting, its sweep
      ("LayerNorm forward", ln_fwd, mb(x, x), "LN_FWD_BLOCKS", LN_SWEEP),
      ("LayerNorm backward", ln_bwd, mb(x, x, x, x), "LN_BWD_BLOCKS", LN_SWEEP),
      ("GELU backward", gelu_bwd, mb(h, h, h), "GELU_BLOCKS", GELU_SWEEP)]
  results, ref = {}, {}
  for name, make, gb, _, _ in passes:
    ms, ref[name] = time_ms(*_flat(make(False)), n=args.calls)
    results[f"{name}, XLA"] = (ms, 0.0)
    print(f"{name + ', XLA':40s} {ms:8.3f} ms  {gb / ms:6.2f} TB/s", flush=True)
  best = {}
  for name, make, gb, setting_name, sweep in passes:
    for setting in sweep if args.sweep else [getattr(kernels, setting_name)]:
      label = f"{name}, Pallas {'/'.join(map(str, setting))}"
      jax.clear_caches()   # the kernels' settings are read when a function is traced
      with mock.patch.object(kernels, setting_name, setting):
        try:
          ms, out = time_ms(*_flat(make(True)), n=args.calls)
        except Exception as e:  # noqa: BLE001  (a setting Triton cannot compile: say so, go on)
          print(f"{label:40s} failed: {str(e).splitlines()[0][:100]}", flush=True)
          continue
      results[label] = (ms, _max_diff(out, ref[name]))
      print(f"{label:40s} {ms:8.3f} ms  {gb / ms:6.2f} TB/s  max relative difference "
            f"{results[label][1]:.2e}", flush=True)
      if name not in best or ms < best[name][1]:
        best[name] = (setting, ms)
  for name, (setting, ms) in best.items():
    print(f"best {name}: {setting} {ms:.3f} ms (XLA {results[name + ', XLA'][0]:.3f} ms)")
  return results


if __name__ == "__main__":
  main()
