"""Times the loss's passes over bf16 logits: evaluation's logsumexp, XLA against gptjax.kernels'
Pallas kernel; d(logits) by autodiff through optax's loss (the plan's loss_kernel off); and the
train step's kernel (the loss, and d(logits) unnormalized, written over the logits: one read and
one write, 2 x 3.3 GB).

    python bench/loss_kernels.py                       # 32768 x 50304: medium, batch 32
    python bench/loss_kernels.py --sweep               # + the train step kernel's settings
    python bench/loss_kernels.py --rows 64 --vocab 3000  # a quick check (CPU: Pallas interpreter)

Prints ms per call (median of 3 windows), the memory bandwidth it implies and the largest
difference from a float32 reference (jax.nn.logsumexp; the gradient of optax's cross-entropy;
d(logits) is written in bf16, so it differs by up to bf16's rounding).
"""
import argparse
import os
import sys
import time
from unittest import mock

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

from gptjax import kernels  # noqa: E402


def time_ms(f, *args, n=20, donate=False):
  """Median of 3 windows of n calls, in ms. With `donate`, f takes one array and returns one like
  it, which the next call takes (kernels that write over their input)."""
  f = jax.jit(f, donate_argnums=(0,) if donate else ())
  out = jax.block_until_ready(f(*args))
  windows = []
  for _ in range(3):
    t = time.perf_counter()
    for _ in range(n):
      out = f(out) if donate else f(*args)
    jax.block_until_ready(out)
    windows.append((time.perf_counter() - t) / n * 1e3)
  return sorted(windows)[1], out


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--rows", type=int, default=32768)
  p.add_argument("--vocab", type=int, default=50304)
  p.add_argument("--calls", type=int, default=20, help="calls per timed window")
  p.add_argument("--sweep", action="store_true",
                 help="time the train step's kernel with other (block, warps) settings too")
  args = p.parse_args(argv)
  print(f"{jax.devices()[0].device_kind}: logits {args.rows} x {args.vocab} bf16")
  kx, kt, kg = jax.random.split(jax.random.key(0), 3)
  x = (4 * jax.random.normal(kx, (args.rows, args.vocab))).astype(jnp.bfloat16)
  # Eight rows with logits in their last quarter 60 above the rest: beyond the train step kernel's
  # first block (at the default block size) they exceed its max by more than DEFER_LIMIT, and the
  # kernel redoes them; the differences below cover them too.
  far = args.vocab * 3 // 4
  x = x.at[:8, far:far + 64].add(60.0)
  t = jax.random.randint(kt, (args.rows,), 0, args.vocab)
  g = jax.random.uniform(kg, (args.rows,))
  lse_ref = jax.nn.logsumexp(x.astype(jnp.float32), axis=-1)
  # An independent reference: the float32 gradient of optax's cross-entropy.
  optax_loss = lambda x: optax.softmax_cross_entropy_with_integer_labels(
      x.astype(jnp.float32), t)
  d_ref = jax.vjp(optax_loss, x.astype(jnp.float32))[1](g)[0]
  gb = x.size * x.dtype.itemsize / 1e9
  results = {}
  for name, f, fargs, ref, traffic in [
      ("logsumexp, XLA", lambda x: jax.nn.logsumexp(x.astype(jnp.float32), axis=-1), (x,),
       lse_ref, gb),
      ("logsumexp, Pallas", kernels.logsumexp, (x,), lse_ref, gb),
      # The loss_kernel-off path: autodiff through optax's loss on the bf16 logits.
      ("d(logits), XLA", lambda x, g: jax.vjp(optax_loss, x)[1](g)[0], (x, g), d_ref, 2 * gb)]:
    ms, out = time_ms(f, *fargs, n=args.calls)
    err = float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref)))
    results[name] = (ms, err)
    print(f"{name:20s} {ms:8.3f} ms  {traffic / ms:6.2f} TB/s  max difference {err:.2e}",
          flush=True)

  # The train step's kernel writes e over its input: each timed call gets the last one's output.
  # d(mean loss)/d(logits) = r * e.
  scale = 1.0 / args.rows
  _, vjp = jax.vjp(lambda x: jnp.mean(optax.softmax_cross_entropy_with_integer_labels(x, t)),
                   x.astype(jnp.float32))
  d_mean_ref = vjp(jnp.float32(1))[0]
  default = (kernels.DEFER_BLOCK, kernels.DEFER_WARPS)
  settings = [default] + ([(4096, 4), (4096, 8), (4096, 16), (8192, 16), (16384, 16)]
                          if args.sweep else [])
  for block, warps in settings:
    name = "deferred" + ("" if (block, warps) == default else f", block {block}, {warps} warps")
    call = lambda x: kernels.softmax_cross_entropy_deferred(x, t, scale)
    f = lambda x: call(x)[3]
    with mock.patch.multiple(kernels, DEFER_BLOCK=block, DEFER_WARPS=warps):
      _, _, r, e = jax.jit(call)(x)
      err = float(jnp.max(jnp.abs(r[:, None] * e.astype(jnp.float32) - d_mean_ref)))
      ms, _ = time_ms(f, e, n=args.calls, donate=True)
    results[name] = (ms, err)
    print(f"{name:20s} {ms:8.3f} ms  {2 * gb / ms:6.2f} TB/s  max difference {err:.2e}",
          flush=True)
  return results


if __name__ == "__main__":
  main()
