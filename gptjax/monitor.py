"""Training-health statistics: pytree reductions inside the compiled step, and the host side that
formats, flags and writes them.

Inside jit (pure): per-layer L2 norms of gradients, weights and updates, update/weight ratios,
statistics over a fixed sample of each tensor's entries, and counts of non-finite values. Each
group is computed under `lax.cond` on its interval, so a step that reports nothing pays nothing.
On the host: one compact log line per report, vanishing/exploding flags, TensorBoard scalars.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np

NEAR_ZERO = 1e-3   # |w| below this counts as "near zero" in the sampled statistics


def layer_name(path) -> str:
  """'block_3/attn', 'block_3/ln1', 'wte', 'ln_f', ...: a block's sub-module, or a top module."""
  keys = [getattr(k, "key", getattr(k, "name", str(k))) for k in path]
  keys = [k for k in keys if k != "params"]
  return "/".join(keys[:2]) if keys[0].startswith("block_") else keys[0]


def layer_names(tree) -> list[str]:
  return sorted({layer_name(p) for p, _ in jax.tree_util.tree_leaves_with_path(tree)})


def _per_layer(tree, leaf_fn, combine):
  out = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    name = layer_name(path)
    value = leaf_fn(leaf)
    out[name] = combine(out[name], value) if name in out else value
  return out


def sq_norms(tree) -> dict:
  return _per_layer(tree, lambda x: jnp.sum(jnp.square(x.astype(jnp.float32))), jnp.add)


def norms(tree) -> dict:
  return {k: jnp.sqrt(v) for k, v in sq_norms(tree).items()}


def nonfinite_counts(tree) -> dict:
  return _per_layer(tree, lambda x: jnp.sum(~jnp.isfinite(x)).astype(jnp.int32), jnp.add)


def make_sample_indices(params, sample_size: int, seed: int):
  """A fixed random sample of entry indices per tensor, chosen once per run (numpy, host)."""
  rng = np.random.default_rng([seed, 7919])
  return jax.tree.map(
      lambda p: jnp.asarray(rng.choice(p.size, size=min(sample_size, p.size), replace=False),
                            jnp.int32), params)


def sample_stats(params, sample_idx) -> dict:
  """Mean, std and near-zero fraction over the fixed sample, per layer (all its tensors pooled)."""
  samples = _per_layer(
      jax.tree.map(lambda p, i: p.reshape(-1)[i].astype(jnp.float32), params, sample_idx),
      lambda x: x, lambda a, b: jnp.concatenate([a, b]))
  return {name: {"mean": jnp.mean(s), "std": jnp.std(s),
                 "near_zero": jnp.mean((jnp.abs(s) < NEAR_ZERO).astype(jnp.float32))}
          for name, s in samples.items()}


def _zeros_like(tree_fn, *args):
  shapes = jax.eval_shape(tree_fn, *args)
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def when(pred, fn, *args):
  """fn(*args) if pred else zeros of the same structure; one `lax.cond`, nothing done when off."""
  return jax.lax.cond(pred, fn, lambda *a: _zeros_like(fn, *a), *args)


def due(step, interval: int, enabled: bool = True):
  return jnp.asarray(enabled and interval > 0) & (step % max(interval, 1) == 0)


def gradient_stats(grads, grad_norm, clip: float) -> dict:
  layer = norms(grads)
  clipped = jnp.minimum(grad_norm, clip) if clip > 0 else grad_norm
  return {"layer": layer, "global_norm": grad_norm, "clipped_norm": clipped,
          "clipped": (grad_norm > clip) if clip > 0 else jnp.asarray(False)}


def weight_stats(params, updates, sample_idx) -> dict:
  w, u = norms(params), norms(updates)
  return {"weight_norm": w, "update_norm": u,
          "update_ratio": {k: u[k] / (w[k] + 1e-12) for k in w},
          "sample": sample_stats(params, sample_idx)}


def sanity_stats(loss, grads, params) -> dict:
  return {"loss": (~jnp.isfinite(loss)).astype(jnp.int32), "grads": nonfinite_counts(grads),
          "params": nonfinite_counts(params)}


# ----------------------------------------------------------------------------- host side

def flat_scalars(stats: dict, prefix: str = "") -> dict:
  """{'grad_norm/block_0/attn': 0.12, ...} from a nested stats dict of host numbers."""
  out = {}
  for k, v in stats.items():
    key = f"{prefix}/{k}" if prefix else k
    if isinstance(v, dict):
      out.update(flat_scalars(v, key))
    else:
      out[key] = float(v)
  return out


def gradient_report(g: dict, vanish: float, explode: float) -> tuple[str, dict, list[str]]:
  layer = {k: float(v) for k, v in g["layer"].items()}
  flags = [f"{k} vanishing ({v:.2e} < {vanish:g})" for k, v in layer.items() if v < vanish]
  flags += [f"{k} exploding ({v:.2e} > {explode:g})" for k, v in layer.items() if v > explode]
  lo, hi = min(layer, key=layer.get), max(layer, key=layer.get)
  line = (f"grad norm {float(g['global_norm']):.3f} -> {float(g['clipped_norm']):.3f}"
          f"{' (clipped)' if bool(g['clipped']) else ''}; min {lo} {layer[lo]:.2e}, "
          f"max {hi} {layer[hi]:.2e}")
  scalars = {f"grad_norm/{k}": v for k, v in layer.items()}
  scalars.update({"grad_norm_global/raw": float(g["global_norm"]),
                  "grad_norm_global/clipped": float(g["clipped_norm"]),
                  "grad_norm_global/clip_fired": float(bool(g["clipped"]))})
  return line, scalars, flags


def weight_report(w: dict) -> tuple[str, dict]:
  ratio = {k: float(v) for k, v in w["update_ratio"].items()}
  median = float(np.median(list(ratio.values())))
  hi = max(ratio, key=ratio.get)
  near_zero = max(float(s["near_zero"]) for s in w["sample"].values())
  line = (f"update/weight median {median:.1e}, max {hi} {ratio[hi]:.1e}; "
          f"max near-zero fraction {near_zero:.2f}")
  scalars = {}
  for group, tag in (("weight_norm", "weight_norm"), ("update_norm", "update_norm"),
                     ("update_ratio", "update_ratio")):
    scalars.update({f"{tag}/{k}": float(v) for k, v in w[group].items()})
  scalars.update(flat_scalars(w["sample"], "weight_sample"))
  return line, scalars


def nonfinite_where(s: dict) -> str:
  """'loss, grads in block_0/attn (12), ...' or '' when everything is finite."""
  parts = ["loss"] if int(s["loss"]) else []
  for kind in ("grads", "params"):
    bad = {k: int(v) for k, v in s[kind].items() if int(v)}
    if bad:
      parts.append(f"{kind} in " + ", ".join(f"{k} ({n})" for k, n in sorted(bad.items())))
  return "; ".join(parts)


def is_finite_number(x) -> bool:
  return math.isfinite(float(x))
