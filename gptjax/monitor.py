"""Training-health statistics: pytree reductions inside the compiled step, and the host side that
formats, flags and writes them.

Inside jit (pure): per-layer L2 norms of gradients, weights and updates, update/weight ratios,
statistics over a fixed sample of each weight matrix's entries, and counts of non-finite values.
Each group is computed under `lax.cond` on its interval, so a step that reports nothing pays
nothing. On the host: one compact log line per report, vanishing/exploding flags, TensorBoard
scalars. `MONITOR_DOC` says how to read them (gptjax.docs prints it in --info).
"""
import math
import re

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

NEAR_ZERO = 1e-3   # |w| below this counts as "near zero" in the sampled statistics

MONITOR_DOC = """\
All statistics are computed on the device inside the compiled train step, each group only at
its interval (lax.cond), and read by the host one step late: no callbacks, no extra pass.
"Layer" means block_<i>/attn, block_<i>/mlp, block_<i>/ln1, block_<i>/ln2, wte (token
embedding, also the tied output head), wpe (position embedding) and ln_f (final LayerNorm).
"step N" in these lines is the N-th update, as in the progress line; reports fall on steps
1, 1 + interval, 1 + 2 * interval, ...

Gradient monitor (--gradient_monitor, every --gradient_monitor_interval steps):
  log "[grad step N] grad norm RAW -> CLIPPED (clipped); min LAYER, max LAYER". TensorBoard:
  grad_norm/<layer>, grad_norm_global/raw, grad_norm_global/clipped, grad_norm_global/clip_fired.
  Clipping fires when the raw global norm exceeds --gradient_clip: now and then is normal, on
  nearly every step the lr is probably too high. A layer whose gradient norm is below
  --config.grad_vanish_threshold (default 1e-7) is flagged "vanishing": it no longer learns
  (dead, or cut off from the loss). One above --config.grad_explode_threshold (default 100,
  the raw norm before clipping) is flagged "exploding"; healthy layers sit around 1e-3 to 1.
Weight monitor (--weight_monitor, on by default, every --weight_monitor_interval steps):
  log "[weights step N] update/weight median R, max LAYER R; near-zero max TENSOR F".
  TensorBoard: weight_norm/<layer>, update_norm/<layer>, update_ratio/<layer> and
  weight_sample/<tensor>/{mean,std,near_zero}. update_ratio = |update| / |weight| of the
  layer: ~1e-3 is healthy; 1e-2 and above means steps too large (lower --lr); below 1e-5 the
  layer barely moves (expected early in warmup). The sample is --weight_monitor_sample_size
  entries of each weight matrix (kernels, embeddings), drawn once from --seed, so its values
  compare over the whole run. near_zero is the sample's fraction with |w| < 1e-3: ~4% for a
  fresh std-0.02 matrix, more for the scaled-down residual projections; a fraction climbing
  toward 1 means the weights are collapsing to zero.
Sanity checks (--sanity_check_interval N; 0 turns the reports off, not the protection):
  every step the compiled step checks that the loss and the global gradient norm are finite;
  a step that fails is not applied to the parameters or the optimizer state (as
  optax.apply_if_finite) and training stops with "error: non-finite values at step N: ..."
  naming what went non-finite (loss, grads, params) and in which layers, and the last good
  snapshot. Every N steps the counts of non-finite values in loss, gradients and parameters
  are read as well. No snapshot is written after a non-finite step, so the last one is good:
  resume from it with a lower --lr, a longer --warmup_steps or --gradient_clip 1.0."""


def _key(k) -> str:
  return str(getattr(k, "key", getattr(k, "name", k)))


def layer_name(path) -> str:
  """'block_3/attn', 'block_3/ln1', 'wte', 'ln_f', ...: a block's sub-module, or a top module."""
  keys = [_key(k) for k in path if _key(k) != "params"]
  return "/".join(keys[:2]) if keys[0].startswith("block_") else keys[0]


def tensor_name(path) -> str:
  """'block_3/attn/qkv/kernel', 'wte/embedding', ...: one parameter tensor."""
  return "/".join(_key(k) for k in path if _key(k) != "params")


def _per_layer(tree, leaf_fn) -> dict:
  """{layer: sum of leaf_fn over the layer's tensors}."""
  out = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    name = layer_name(path)
    value = leaf_fn(leaf)
    out[name] = out[name] + value if name in out else value
  return out


def norms(tree) -> dict:
  """{layer: L2 norm over all the layer's tensors}, accumulated in float32."""
  sq = _per_layer(tree, lambda x: jnp.sum(jnp.square(x.astype(jnp.float32))))
  return {k: jnp.sqrt(v) for k, v in sq.items()}


def nonfinite_counts(tree) -> dict:
  return _per_layer(tree, lambda x: jnp.sum(~jnp.isfinite(x)).astype(jnp.int32))


def make_sample_indices(params, sample_size: int, seed: int) -> dict:
  """{tensor: flat indices}: a fixed random sample of each weight matrix's entries, chosen once
  per run (numpy, on the host). Vectors (biases, LayerNorm) are left out: they are small and
  start at constants, so their norms already say all a sample would."""
  rng = np.random.default_rng([seed, 7919])
  return {tensor_name(path): jnp.asarray(
              rng.choice(p.size, size=min(sample_size, p.size), replace=False), jnp.int32)
          for path, p in jax.tree_util.tree_leaves_with_path(params) if p.ndim >= 2}


def sample_stats(params, sample_idx: dict) -> dict:
  """{tensor: {mean, std, near_zero}} over the fixed sample of each weight matrix."""
  out = {}
  for path, p in jax.tree_util.tree_leaves_with_path(params):
    name = tensor_name(path)
    if name in sample_idx:
      s = p.reshape(-1)[sample_idx[name]].astype(jnp.float32)
      out[name] = {"mean": jnp.mean(s), "std": jnp.std(s),
                   "near_zero": jnp.mean((jnp.abs(s) < NEAR_ZERO).astype(jnp.float32))}
  return out


class Packed(flax.struct.PyTreeNode):
  """A nested dict of statistics kept as one flat array per dtype (`arrays`), and where each
  statistic lies in them (`layout`, static: the tree's structure and per leaf its array, offset
  and shape). `unpack()` gives the dict back, on the host after jax.device_get or in jit."""
  arrays: tuple
  layout: tuple = flax.struct.field(pytree_node=False)

  def unpack(self) -> dict:
    treedef, slots = self.layout
    return jax.tree.unflatten(treedef, [
        self.arrays[i][offset:offset + math.prod(shape)].reshape(shape)
        for i, offset, shape in slots])


def when(pred, fn, *args) -> Packed:
  """fn(*args) if pred else zeros of the same structure, in one `lax.cond`: nothing is computed
  when off. The result is Packed: one flat array per dtype leaves the cond, so the branch not
  taken writes a few zero-filled buffers, where a tree of statistics made XLA write, and copy,
  hundreds of small ones every step (bench/HISTORY.md)."""
  leaves, treedef = jax.tree.flatten(jax.eval_shape(fn, *args))
  dtypes = sorted({jnp.dtype(leaf.dtype) for leaf in leaves}, key=str)
  slots, sizes = [], [0] * len(dtypes)
  for leaf in leaves:
    i = dtypes.index(leaf.dtype)
    slots.append((i, sizes[i], leaf.shape))
    sizes[i] += leaf.size

  def flat(*a):
    values = jax.tree.leaves(fn(*a))
    return tuple(jnp.concatenate([jnp.ravel(v) for v, (j, _, _) in zip(values, slots) if j == i])
                 for i in range(len(dtypes)))

  zeros = lambda *a: tuple(jnp.zeros(n, dtype) for n, dtype in zip(sizes, dtypes))
  return Packed(jax.lax.cond(pred, flat, zeros, *args), (treedef, tuple(slots)))


def due(step, interval: int):
  """Whether a monitor with this interval reports at (0-based) `step`; never when interval <= 0."""
  if interval <= 0:
    return jnp.zeros((), bool)
  return step % interval == 0


def gradient_stats(grads, grad_norm, clip: float) -> dict:
  """Per-layer norms, and the global norm before and after optax.clip_by_global_norm(clip)."""
  clipped = jnp.minimum(grad_norm, clip) if clip > 0 else grad_norm
  return {"layer": norms(grads), "global_norm": grad_norm, "clipped_norm": clipped,
          "clipped": (grad_norm > clip) if clip > 0 else jnp.zeros((), bool)}


def weight_stats(params, new_params, sample_idx) -> dict:
  """Per-layer |w|, |new - w| and their ratio, and the sampled statistics of `params`.

  The update is taken as new_params - params rather than optax's `updates`, so the compiled
  step need not keep `updates` in memory beside the new parameters it writes anyway."""
  w = norms(params)
  u = norms(jax.tree.map(jnp.subtract, new_params, params))
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
  """(log line, TensorBoard scalars, flags) of one gradient-monitor read."""
  layer = {k: float(v) for k, v in g["layer"].items()}
  flags = [f"{k} vanishing ({v:.2e} < {vanish:g})" for k, v in layer.items() if v < vanish]
  flags += [f"{k} exploding ({v:.2e} > {explode:g})" for k, v in layer.items() if v > explode]
  lo, hi = min(layer, key=layer.get), max(layer, key=layer.get)
  line = (f"grad norm {float(g['global_norm']):.4g} -> {float(g['clipped_norm']):.4g}"
          f"{' (clipped)' if bool(g['clipped']) else ''}; min {lo} {layer[lo]:.2e}, "
          f"max {hi} {layer[hi]:.2e}")
  scalars = flat_scalars(g["layer"], "grad_norm")
  scalars.update({"grad_norm_global/raw": float(g["global_norm"]),
                  "grad_norm_global/clipped": float(g["clipped_norm"]),
                  "grad_norm_global/clip_fired": float(bool(g["clipped"]))})
  return line, scalars, flags


def weight_report(w: dict) -> tuple[str, dict]:
  """(log line, TensorBoard scalars) of one weight-monitor read."""
  ratio = {k: float(v) for k, v in w["update_ratio"].items()}
  median = float(np.median(list(ratio.values())))
  hi = max(ratio, key=ratio.get)
  line = f"update/weight median {median:.1e}, max {hi} {ratio[hi]:.1e}"
  near_zero = {k: float(s["near_zero"]) for k, s in w["sample"].items()}
  if near_zero:
    top = max(near_zero, key=near_zero.get)
    line += f"; near-zero max {top} {near_zero[top]:.2f}"
  scalars = {}
  for group in ("weight_norm", "update_norm", "update_ratio"):
    scalars.update(flat_scalars(w[group], group))
  scalars.update(flat_scalars(w["sample"], "weight_sample"))
  return line, scalars


def _model_order(name: str):
  """block_2 before block_10: numbers in a layer name compare as numbers."""
  return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def nonfinite_where(s: dict, max_layers: int = 4) -> str:
  """'loss; grads in block_0/attn (12), wte (3)' or '' when everything is finite; at most
  `max_layers` layers of each kind are named, blocks in order."""
  parts = ["loss"] if int(s["loss"]) else []
  for kind in ("grads", "params"):
    bad = sorted(((k, int(v)) for k, v in s[kind].items() if int(v)),
                 key=lambda kv: _model_order(kv[0]))
    if bad:
      shown = ", ".join(f"{k} ({n:,})" for k, n in bad[:max_layers])
      more = f" and {len(bad) - max_layers} more layers" if len(bad) > max_layers else ""
      parts.append(f"{kind} in {shown}{more}")
  return "; ".join(parts)

