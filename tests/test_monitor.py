"""Training-health monitors: the statistics of the compiled step against direct computation, no
host callbacks in it, the host-side reports, and a run that blows up stopping cleanly."""
import glob
import os
import re
import subprocess
import sys

import flax.traverse_util
import jax
import jax.extend.core as jex
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from conftest import REPO, read_run_log, read_tensorboard_scalars
from gptjax import checkpoint, monitor, optim
from gptjax.config import ConfigError, base_config, validate
from gptjax.model import GPT, ModelConfig
from gptjax.step import init_state, make_train_step

SEQ = 16
LAYERS = {f"block_{i}/{m}" for i in range(2) for m in ("attn", "mlp", "ln1", "ln2")} | {
    "wte", "wpe", "ln_f"}
MATRICES = {f"block_{i}/{m}" for i in range(2) for m in
            ("attn/qkv/kernel", "attn/proj/kernel", "mlp/fc/kernel", "mlp/proj/kernel")} | {
    "wte/embedding", "wpe/embedding"}


def step_config(**overrides):
  config = base_config()
  config.update(dropout=0.0, lr=1e-2, warmup_steps=0, gradient_clip=0.05,
                gradient_monitor=True, gradient_monitor_interval=2, weight_monitor=True,
                weight_monitor_interval=2, weight_monitor_sample_size=64,
                sanity_check_interval=0)
  config.update(**overrides)
  return config


def build(config, total_steps=10):
  """(model, jitted train step, fresh state, sample indices, batches) on a 128-token vocabulary."""
  model = GPT(ModelConfig(vocab_size=128, d_model=32, num_heads=2, num_layers=2, d_ff=64,
                          max_seq_len=SEQ, dropout=config.dropout))
  schedule = optim.make_schedule(config, total_steps)
  tx = optim.make_optimizer(config, schedule)
  # Jitted: one compile is much faster than running the initializers op by op.
  state = jax.jit(lambda key: init_state(model, tx, key, SEQ))(jax.random.key(0))
  sample_idx = monitor.make_sample_indices(state.params, config.weight_monitor_sample_size, 3)
  step = make_train_step(model, tx, schedule, config, sample_idx)
  batches = np.random.default_rng(0).integers(0, 128, (3, 4, SEQ + 1), dtype=np.int32)
  return model, step, state, sample_idx, batches


@pytest.fixture(scope="module")
def monitored():
  """One compiled step shared by the tests below (compiling dominates their time): gradient and
  weight monitors every 2 steps, clipping at 0.05 (it fires), sanity reports off."""
  model, step, state, sample_idx, batches = build(step_config())
  return model, step, host_copy(state), sample_idx, batches


def direct_loss(model, params, batch):
  logits = model.apply({"params": params}, batch[:, :-1])
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()


def layer_norms(tree) -> dict:
  """{layer: float64 L2 norm}, the layers grouped from the flattened parameter names."""
  sq = {}
  for name, x in flax.traverse_util.flatten_dict(jax.device_get(tree), sep="/").items():
    parts = name.split("/")
    layer = "/".join(parts[:2]) if parts[0].startswith("block_") else parts[0]
    sq[layer] = sq.get(layer, 0.0) + float(np.sum(np.asarray(x, np.float64) ** 2))
  return {k: np.sqrt(v) for k, v in sq.items()}


def host_copy(tree):
  return jax.tree.map(np.array, jax.device_get(tree))


def device_copy(tree):
  """New device buffers: the step donates its state, which must not be the host copy's memory."""
  return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)


def test_gradient_and_update_statistics_equal_direct_computation(monitored):
  model, step, initial, _, batches = monitored
  state = device_copy(initial)
  loss, grads = jax.jit(jax.value_and_grad(direct_loss, argnums=1), static_argnums=0)(
      model, state.params, batches[0])
  new_state, m = step(state, batches[0], jax.random.key(1))   # donates `state`
  # Each monitor's cond returns one flat array per dtype, not one per statistic: float32 and the
  # bool `clipped` (gradient), float32 (weight), int32 counts (sanity).
  assert [a.dtype for a in m["grad"].arrays] == [np.dtype(bool), np.dtype(np.float32)]
  assert [a.ndim for a in m["grad"].arrays + m["weight"].arrays + m["sanity"].arrays] == [1] * 4
  assert len(m["weight"].arrays) == len(m["sanity"].arrays) == 1
  g = jax.device_get(m["grad"]).unpack()

  assert bool(m["finite"]) and abs(float(m["loss"]) - float(loss)) < 1e-5
  expected = layer_norms(grads)
  assert set(g["layer"]) == set(expected) == LAYERS
  for name, norm in expected.items():
    np.testing.assert_allclose(g["layer"][name], norm, rtol=2e-5, err_msg=name)
  raw = np.sqrt(sum(v ** 2 for v in expected.values()))
  np.testing.assert_allclose(g["global_norm"], raw, rtol=2e-5)
  np.testing.assert_allclose(float(m["grad_norm"]), raw, rtol=2e-5)
  after = optax.global_norm(optax.clip_by_global_norm(0.05).update(grads, None)[0])
  np.testing.assert_allclose(g["clipped_norm"], after, rtol=2e-5)
  assert raw > 0.05 and bool(g["clipped"])
  for clip in (1e3, 0.0):  # clipping on but not firing, and off: "after" is the raw norm
    other = jax.device_get(monitor.gradient_stats(grads, optax.global_norm(grads), clip))
    np.testing.assert_allclose(other["clipped_norm"], raw, rtol=2e-5)
    assert not other["clipped"]

  # The update/weight ratio is |new - old| / |old| of each layer, new being what the step kept.
  w = jax.device_get(m["weight"]).unpack()
  delta = jax.tree.map(np.subtract, host_copy(new_state.params), initial.params)
  old_norms, delta_norms = layer_norms(initial.params), layer_norms(delta)
  for name in LAYERS:
    np.testing.assert_allclose(w["weight_norm"][name], old_norms[name], rtol=2e-5)
    np.testing.assert_allclose(w["update_norm"][name], delta_norms[name], rtol=1e-4, atol=1e-9)
    np.testing.assert_allclose(w["update_ratio"][name], delta_norms[name] / old_norms[name],
                               rtol=1e-4, atol=1e-9)
  assert min(delta_norms.values()) > 0    # every layer moved: the ratios are not trivially 0

  # A healthy first step raises no flag with the default thresholds.
  defaults = base_config()
  _, _, flags = monitor.gradient_report(g, defaults.grad_vanish_threshold,
                                        defaults.grad_explode_threshold)
  assert flags == []


def test_sample_statistics_use_one_fixed_sample_and_intervals_gate(monitored):
  _, step, initial, sample_idx, batches = monitored
  assert set(sample_idx) == MATRICES    # weight matrices only, not biases or LayerNorms
  for name, idx in sample_idx.items():
    assert idx.shape == (64,) and len(np.unique(np.asarray(idx))) == 64, name
  # Chosen from the seed alone, so a resumed run samples the same entries.
  again = monitor.make_sample_indices(initial.params, 64, 3)
  other = monitor.make_sample_indices(initial.params, 64, 4)
  assert all(np.array_equal(again[k], sample_idx[k]) for k in sample_idx)
  assert not all(np.array_equal(other[k], sample_idx[k]) for k in sample_idx)
  small = monitor.make_sample_indices(initial.params, 10**6, 3)
  assert small["wpe/embedding"].shape == (SEQ * 32,)     # never more than the tensor holds

  state, seen = device_copy(initial), []
  for i in range(3):
    before = flax.traverse_util.flatten_dict(host_copy(state.params), sep="/")
    state, m = step(state, batches[i], jax.random.key(1))
    if i == 1:  # interval 2: step 1 is not due; the cond's other branch returns zeros
      off = jax.device_get((m["grad"], m["weight"]))
      assert all(float(x) == 0 for x in jax.tree.leaves([p.unpack() for p in off]))
      assert float(m["grad_norm"]) > 0    # the every-step scalars are still there
      continue
    sample = jax.device_get(m["weight"]).unpack()["sample"]
    assert set(sample) == MATRICES
    for name, idx in sample_idx.items():
      s = before[name].reshape(-1)[np.asarray(idx)]
      np.testing.assert_allclose(sample[name]["mean"], s.mean(), rtol=1e-4, atol=1e-7)
      np.testing.assert_allclose(sample[name]["std"], s.std(), rtol=1e-4)
      np.testing.assert_allclose(sample[name]["near_zero"], np.mean(np.abs(s) < 1e-3))
    seen.append(float(sample["block_0/mlp/fc/kernel"]["mean"]))
  assert seen[0] != seen[1]     # the weights moved, the sample stayed


def test_nonfinite_step_is_not_applied_and_says_where(monitored):
  _, step, initial, _, batches = monitored    # sanity reports off: the protection stays on
  fc = initial.params["block_1"]["mlp"]["fc"]
  poisoned = initial.replace(params={**initial.params, "block_1": {
      **initial.params["block_1"], "mlp": {**initial.params["block_1"]["mlp"], "fc": {
          **fc, "kernel": fc["kernel"].copy()}}}})
  poisoned.params["block_1"]["mlp"]["fc"]["kernel"][0, 0] = np.nan
  new_state, m = step(device_copy(poisoned), batches[0], jax.random.key(1))
  assert not bool(m["finite"])
  after = host_copy(new_state)
  assert int(after.step) == int(poisoned.step)       # the step counter did not move either
  for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(poisoned)):
    np.testing.assert_array_equal(a, b)              # params and optimizer state untouched
  where = monitor.nonfinite_where(jax.device_get(m["sanity"]).unpack())
  assert where.startswith("loss; grads in ")
  assert where.endswith("params in block_1/mlp (1)")


def test_monitors_off_add_no_keys():
  config = step_config(gradient_monitor=False, weight_monitor=False)
  _, step, state, _, batches = build(config)
  _, m = step(state, batches[0], jax.random.key(1))
  assert set(m) == {"loss", "grad_norm", "lr", "finite", "sanity"}
  assert monitor.nonfinite_where(jax.device_get(m["sanity"]).unpack()) == ""


def _primitive_names(jaxpr) -> set:
  """Every primitive in `jaxpr` and, recursively, in the jaxprs inside its equations."""
  names = {eqn.primitive.name for eqn in jaxpr.eqns}
  for sub in jex.subjaxprs(jaxpr):
    names |= _primitive_names(sub)
  return names


def _host_calls(step, state, batch) -> tuple[set, bool]:
  jaxpr = jax.make_jaxpr(step)(state, batch, jax.random.key(1)).jaxpr
  names = {n for n in _primitive_names(jaxpr)
           if any(s in n for s in ("callback", "print", "outside_call", "infeed", "outfeed"))}
  lowered = step.lower(state, batch, jax.random.key(1)).as_text()
  return names, "callback" in lowered


def test_train_step_with_all_monitors_has_no_host_callbacks(monkeypatch):
  config = step_config(gradient_monitor_interval=1, weight_monitor_interval=1,
                       sanity_check_interval=1, dropout=0.1)   # dropout: its RNG path too
  _, step, state, _, batches = build(config)
  names, in_hlo = _host_calls(step, state, batches[0])
  assert names == set() and not in_hlo

  # The same search does find a print hidden in a monitor's lax.cond branch.
  stats = monitor.gradient_stats

  def printing(*args):
    out = stats(*args)
    jax.debug.print("grad norm {}", out["global_norm"])
    return out

  monkeypatch.setattr(monitor, "gradient_stats", printing)
  _, step, state, _, batches = build(config)
  names, in_hlo = _host_calls(step, state, batches[0])
  assert names and in_hlo


def test_host_reports_flags_and_tags():
  g = {"layer": {"block_0/attn": 3e-9, "block_0/mlp": 0.5, "wte": 250.0}, "global_norm": 250.0,
       "clipped_norm": 1.0, "clipped": True}
  line, scalars, flags = monitor.gradient_report(g, 1e-7, 100.0)
  assert line == ("grad norm 250 -> 1 (clipped); min block_0/attn 3.00e-09, "
                  "max wte 2.50e+02")
  assert flags == ["block_0/attn vanishing (3.00e-09 < 1e-07)",
                   "wte exploding (2.50e+02 > 100)"]
  assert scalars == {"grad_norm/block_0/attn": 3e-9, "grad_norm/block_0/mlp": 0.5,
                     "grad_norm/wte": 250.0, "grad_norm_global/raw": 250.0,
                     "grad_norm_global/clipped": 1.0, "grad_norm_global/clip_fired": 1.0}

  w = {"weight_norm": {"wte": 2.0, "ln_f": 4.0}, "update_norm": {"wte": 2e-3, "ln_f": 4e-2},
       "update_ratio": {"wte": 1e-3, "ln_f": 1e-2},
       "sample": {"wte/embedding": {"mean": 0.0, "std": 0.02, "near_zero": 0.04}}}
  line, scalars = monitor.weight_report(w)
  assert line == ("update/weight median 5.5e-03, max ln_f 1.0e-02; "
                  "near-zero max wte/embedding 0.04")
  assert scalars["update_ratio/ln_f"] == 1e-2 and scalars["weight_norm/wte"] == 2.0
  assert scalars["weight_sample/wte/embedding/near_zero"] == 0.04

  layers = {f"block_{i}/attn": 0 for i in range(12)}
  layers.update({"block_10/attn": 2, "block_2/attn": 5, "block_9/attn": 1, "wte": 7, "wpe": 1})
  where = monitor.nonfinite_where({"loss": 0, "grads": layers, "params": {}}, max_layers=3)
  assert where == "grads in block_2/attn (5), block_9/attn (1), block_10/attn (2) and 2 more layers"


def test_threshold_defaults_and_validation():
  config = base_config()
  assert 0 < config.grad_vanish_threshold <= 1e-6 and 10 <= config.grad_explode_threshold
  validate_fields = dict(dataset="wikitext")
  for field, value, needle in (("grad_vanish_threshold", -1.0, "must be >= 0"),
                               ("grad_explode_threshold", 1e-8, "must be above")):
    bad = base_config()
    bad.update(**validate_fields, **{field: value})
    with pytest.raises(ConfigError, match=f"^{field}: .*{needle}"):
      validate(bad)
  assert len(monitor.MONITOR_DOC.splitlines()) <= 40
  for needle in ("grad_vanish_threshold", "grad_explode_threshold", "update_ratio", "1e-3",
                 "near_zero", "sanity_check_interval"):
    assert needle in monitor.MONITOR_DOC


# ----------------------------------------------------------------------------- a run that blows up

def test_absurd_learning_rate_stops_cleanly_with_good_snapshots(tiny_config):
  run_dir = tiny_config.output_dir
  # lr 1e4 (no clipping) passes a few steps before the loss overflows; snapshots every 2 steps
  # make sure good ones exist when it does.
  argv = [sys.executable, "-m", "gptjax.train", "--dataset", tiny_config.dataset,
          "--data_cache_dir", tiny_config.data_cache_dir, "--output_dir", run_dir,
          "--d_model", "32", "--num_heads", "2", "--num_layers", "2", "--d_ff", "64",
          "--max_seq_len", "32", "--batch_size", "8", "--dropout", "0", "--lr", "1e4",
          "--warmup_steps", "1000", "--gradient_clip", "0", "--snapshot_interval", "2",
          "--keep_last_n_snapshots", "2", "--no_delete_snapshots_after_training",
          "--gradient_monitor", "--gradient_monitor_interval", "1", "--weight_monitor_interval",
          "1", "--log_interval", "1", "--config.grad_vanish_threshold=50",
          "--config.sample_prompts="]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr
  (error,) = proc.stderr.strip().splitlines()[-1:]
  assert proc.stderr.strip() == error, proc.stderr[-3000:]   # one line, nothing else
  match = re.match(r"error: non-finite values at step (\d+): (.*); last good snapshot: (\S+)\. ",
                   error)
  assert match, error
  bad_step, where, last = int(match[1]), match[2], match[3]
  assert re.match(r"(loss; )?grads in (block_\d/\w+|wte|wpe|ln_f) \(", where), where
  assert "the update was not applied" in where

  # The snapshots on disk: all before the bad step, the newest the one named, every value finite.
  snaps = sorted(glob.glob(os.path.join(run_dir, "snapshots", "snapshot_*")),
                 key=lambda p: int(p.rsplit("_", 1)[1]))
  assert snaps and last == snaps[-1], (snaps, last)
  for path in snaps:
    _, step = checkpoint.snapshot_step(path)
    assert step < bad_step
    with ocp.StandardCheckpointer() as ckpt:
      state = ckpt.restore(os.path.join(path, "state"))
    leaves = jax.tree.leaves(state)
    assert leaves and all(np.isfinite(np.asarray(x)).all() for x in leaves), path
  assert not os.path.exists(os.path.join(run_dir, "models"))    # no final model either

  log = read_run_log(run_dir)
  assert f"Training stopped: {error[len('error: '):]}" in log
  assert re.search(r"\[grad step 1\] WARNING block_0/attn vanishing \(\S+ < 50\)", log)
  assert re.search(r"\[grad step \d+\] WARNING \S+ exploding \(\S+ > 100\)", log)
  assert "[weights step 1] update/weight median" in log
  tags = set(read_tensorboard_scalars(run_dir))
  for tag in ("grad_norm/block_0/attn", "grad_norm/wte", "grad_norm_global/raw",
              "grad_norm_global/clipped", "update_ratio/block_1/mlp", "weight_norm/ln_f",
              "update_norm/wpe", "weight_sample/wte/embedding/near_zero", "train/loss"):
    assert tag in tags, tag
