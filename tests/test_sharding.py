"""Scale-out on CPU: the same run on 1, 2 and 4 devices, with and without fsdp, across a
snapshot taken on one mesh and resumed on another, and over two processes joined by
`jax.distributed.initialize`.

A JAX process sees its device count once, so every multi-device run is a subprocess with
XLA_FLAGS=--xla_force_host_platform_device_count=N running this file as a driver
(`python tests/test_sharding.py JOBS_JSON`); it prints one `RESULT {json}` line. Runs that
need nothing from each other start together, and all share one persistent compilation cache.
"""
import json
import os
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO, read_tensorboard_scalars
from gptjax import sharding
from gptjax.config import ConfigError, base_config

# 2 epochs of 15 steps of 4 sequences of 16 tokens (~1K training tokens, ~600 and ~750 to
# validate and test), every monitor on; dropout too (its masks must not depend on the mesh).
LINES = {"train.txt": 12, "valid.txt": 12, "test.txt": 8}
RUN = dict(d_model=16, num_heads=2, num_layers=2, d_ff=32, max_seq_len=16, batch_size=4,
           eval_batch_size=32, epochs=2, lr=3e-3, warmup_steps=10, dropout=0.1,
           sample_prompts="", log_interval=5, gradient_monitor=True, gradient_monitor_interval=8,
           weight_monitor_interval=8, sanity_check_interval=8,
           delete_snapshots_after_training=False)
# float32 sums in another order: a loss near 10.35 (and so its perplexity, relatively) has
# differed by 1.07e-5 between device counts.
TOL = 2e-5


# ----------------------------------------------------------------------------- driver side

def _train_job(overrides: dict) -> dict:
  from gptjax import trainer
  config = base_config()
  config.update(overrides)
  try:
    result = trainer.train_and_evaluate(config)
  except ConfigError as e:
    return {"error": str(e)}
  params = result["params"]
  return {"history": result["history"], "test_loss": result["test_loss"],
          "initial_val_loss": result["initial_val_loss"], "model_path": result["model_path"],
          "specs": {jax.tree_util.keystr(p): str(x.sharding.spec)
                    for p, x in jax.tree_util.tree_leaves_with_path(params)},
          "checksum": _checksum(params)}


def _checksum(params) -> float:
  return float(sum(np.abs(np.asarray(x, np.float64)).sum() for x in jax.tree.leaves(params)))


def _reductions_job() -> dict:
  """Norms and non-finite counts, jitted over trees split 4 ways, against numpy on the host."""
  import optax
  from gptjax import monitor
  config = base_config()
  config.mesh_fsdp = -1
  mesh = sharding.make_mesh(config)
  rng = np.random.default_rng(0)
  clean = {"wte": {"embedding": rng.normal(size=(128, 32)).astype(np.float32)},
           "block_0": {"mlp": {"fc": {"kernel": rng.normal(size=(32, 64)).astype(np.float32),
                                      "bias": rng.normal(size=(64,)).astype(np.float32)}}}}
  bad = jax.tree.map(np.copy, clean)
  bad["wte"]["embedding"][-3:, 5] = np.inf   # in the last of the 4 shards
  bad["block_0"]["mlp"]["fc"]["kernel"][0, -1] = np.nan
  put = lambda t: jax.device_put(t, sharding.tree_shardings(t, mesh))
  stats = jax.jit(lambda c, b: {
      "global": optax.global_norm(c), "layer": monitor.norms(c),
      "sanity": monitor.sanity_stats(jnp.sum(b["wte"]["embedding"]), b, b)})
  out = jax.device_get(stats(put(clean), put(bad)))
  sq = lambda t: sum(float((x.astype(np.float64) ** 2).sum()) for x in jax.tree.leaves(t))
  return {"specs": [str(x.sharding.spec) for x in jax.tree.leaves(put(clean))],
          "global": float(out["global"]), "global_host": sq(clean) ** 0.5,
          "layer": {k: float(v) for k, v in out["layer"].items()},
          "layer_host": {"wte": sq(clean["wte"]) ** 0.5,
                         "block_0/mlp": sq(clean["block_0"]) ** 0.5},
          "sanity": jax.tree.map(int, out["sanity"])}


def _state_specs_job(shard_optimizer: bool = False) -> dict:
  """The layout of the whole train state under fsdp=4 (or, with shard_optimizer, data
  parallelism with ZeRO-1), derived from shapes alone (no compile)."""
  from gptjax import optim
  from gptjax.model import GPT, ModelConfig
  from gptjax.step import init_state
  config = base_config()
  config.mesh_fsdp = 1 if shard_optimizer else 4
  model = GPT(ModelConfig(vocab_size=128, d_model=32, num_heads=2, num_layers=2, d_ff=64,
                          max_seq_len=16))
  tx = optim.make_optimizer(config, optim.make_schedule(config, 10))
  abstract = jax.eval_shape(lambda key: init_state(model, tx, key, 16), jax.random.key(0))
  shardings = sharding.state_shardings(abstract, sharding.make_mesh(config), shard_optimizer)
  return {jax.tree_util.keystr(p): str(s.spec)
          for p, s in jax.tree_util.tree_leaves_with_path(shardings)}


def _load_job(path: str) -> dict:
  from gptjax import checkpoint
  params, _ = checkpoint.load_params(path)
  return {"checksum": _checksum(params)}


def _kernels_job() -> dict:
  """The fused block with every Pallas kernel (LayerNorm, GELU backward, loss; in Pallas'
  interpreter), on a (data 2, fsdp 2) mesh with its weights sharded, against the plain block: the
  training loss and gradients, and evaluation's per-token losses."""
  import dataclasses
  from jax.sharding import NamedSharding
  from gptjax import kernels, step
  from gptjax.model import GPT, ModelConfig
  kernels.DEFER_BLOCK = 64   # rows of 256 logits in 4 blocks
  config = base_config()
  config.mesh_fsdp = 2
  mesh = sharding.make_mesh(config)
  plain = ModelConfig(vocab_size=256, d_model=48, num_heads=2, num_layers=2, d_ff=96,
                      max_seq_len=16, dropout=0.0)
  fused = dataclasses.replace(plain, fused_block=True, block_kernels=True, loss_kernel=True)
  tokens = jax.random.randint(jax.random.key(1), (8, 17), 0, 256)
  params = GPT(plain).init(jax.random.key(0), tokens[:, :-1])["params"]
  leaves, treedef = jax.tree.flatten(params)
  params = treedef.unflatten([p + 0.1 * jax.random.normal(jax.random.key(i), p.shape)
                              for i, p in enumerate(leaves)])
  params = jax.device_put(params, sharding.tree_shardings(params, mesh))
  tokens = jax.device_put(tokens, NamedSharding(mesh, sharding.BATCH_SPEC))

  def loss_grads_losses(cfg):
    def f(params, tokens):
      model = GPT(cfg)
      loss = lambda p: step.train_loss(model, p, tokens[:, :-1], tokens[:, 1:])
      return (*jax.value_and_grad(loss)(params),
              step.token_losses(model, params, tokens[:, :-1], tokens[:, 1:]))
    f = step.on_mesh(f, mesh)
    return jax.jit(f)(params, tokens), str(jax.make_jaxpr(f)(params, tokens))

  (ref, _), (got, jaxpr) = loss_grads_losses(plain), loss_grads_losses(fused)
  d = plain.d_model
  for g in (ref[1], got[1]):   # k's bias: left out by the fused block (see test_model)
    for i in range(plain.num_layers):
      qkv = g[f"block_{i}"]["attn"]["qkv"]
      qkv["bias"] = qkv["bias"].at[d:2 * d].set(0)
  rel = lambda a, b: float(jnp.linalg.norm(a - b) / (jnp.linalg.norm(b) + 1e-12))
  return {"loss": [float(got[0]), float(ref[0])],
          "grads_rel": max(jax.tree.leaves(jax.tree.map(rel, got[1], ref[1]))),
          "token_losses_rel": rel(got[2], ref[2]),
          "shard_maps": jaxpr.count("shard_map["), "pallas_calls": jaxpr.count("pallas_call[")}


def _driver(jobs: list) -> None:
  first = jobs[0].get("config", {})
  if first.get("coordinator_address"):
    config = base_config()
    config.update(first)
    sharding.initialize_distributed(config)
  kinds = {"train": lambda job: _train_job(job["config"]),
           "reductions": lambda job: _reductions_job(),
           "state_specs": lambda job: _state_specs_job(job.get("shard_optimizer", False)),
           "kernels": lambda job: _kernels_job(),
           # what each process names a path after: its own text, process 0's on return
           "agree": lambda job: sharding.from_process_0(f"process {jax.process_index()}"),
           "load": lambda job: _load_job(job["path"])}
  results = [kinds[job["kind"]](job) for job in jobs]
  print("RESULT " + json.dumps({"process": jax.process_index(), "devices": jax.device_count(),
                                "results": results}), flush=True)


# ----------------------------------------------------------------------------- test side

def _launch(jobs, n_devices: int, cache_dir: str) -> subprocess.Popen:
  # LLVM at -O0 halves the compile time, which is most of these runs' time on a CPU.
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO,
             XLA_FLAGS=f"--xla_force_host_platform_device_count={n_devices} "
                       "--xla_backend_optimization_level=0",
             JAX_COMPILATION_CACHE_DIR=cache_dir, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  return subprocess.Popen([sys.executable, os.path.abspath(__file__), json.dumps(jobs)], cwd=REPO,
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _results(proc: subprocess.Popen) -> dict:
  out, _ = proc.communicate(timeout=900)
  lines = [l for l in out.splitlines() if l.startswith("RESULT ")]
  assert proc.returncode == 0 and lines, out[-4000:]
  return json.loads(lines[-1][len("RESULT "):])


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(corpus, tmp_path_factory):
  """Every subprocess run of this file, in two waves (the second resumes the first's snapshot)."""
  root = tmp_path_factory.mktemp("sharding")
  cache, dataset, token_cache = (str(root / d) for d in ("xla_cache", "text", "tokens"))
  os.makedirs(dataset)
  for name, n_lines in LINES.items():
    with open(os.path.join(corpus, name)) as src, open(os.path.join(dataset, name), "w") as dst:
      dst.writelines(src.readlines()[:n_lines])

  def run(name, **extra):
    return {"kind": "train",
            "config": dict(RUN, dataset=dataset, data_cache_dir=token_cache,
                           output_dir=str(root / name), **extra)}

  # Tokenized once here, rather than by several processes racing to do it.
  from gptjax import data
  for split in data.SPLITS:
    data.load_tokens(dataset, split, "gpt2", 0, token_cache)
  port = _free_port()
  wave1 = {
      "four": _launch([run("dp4"), run("fsdp4", mesh_fsdp=4), run("bad", batch_size=6),
                       {"kind": "reductions"}, {"kind": "state_specs"}, {"kind": "kernels"},
                       run("zero4", shard_optimizer=True),
                       {"kind": "state_specs", "shard_optimizer": True}], 4, cache),
      "pair": [_launch([run("two_procs", coordinator_address=f"localhost:{port}",
                            num_processes=2, process_id=i), {"kind": "agree"}], 2, cache)
               for i in (0, 1)]}
  out = {"four": _results(wave1["four"]), "pair": [_results(p) for p in wave1["pair"]]}
  fsdp4 = out["four"]["results"][1]
  epoch1 = os.path.join(root, "fsdp4", "snapshots", f"snapshot_{fsdp4['history'][0]['step']}")
  # The resumed runs differ from the fresh ones beside them only in where they start, so they
  # reuse their compilations from the cache.
  wave2 = {
      "two": _launch([run("dp2"), run("resume2", checkpoint_file=epoch1, yes=True)], 2, cache),
      "one": _launch([run("dp1"), run("resume1", checkpoint_file=epoch1, yes=True),
                      {"kind": "load", "path": fsdp4["model_path"]}], 1, cache)}
  out.update({k: _results(p) for k, p in wave2.items()})
  out["scalars"] = {name: read_tensorboard_scalars(str(root / name))
                    for name in ("dp4", "fsdp4", "two_procs", "dp2", "resume2", "dp1", "resume1")}
  return out


def _assert_same_run(a: dict, b: dict):
  for e in range(RUN["epochs"]):
    for key in ("train_loss", "val_loss"):
      assert abs(a["history"][e][key] - b["history"][e][key]) < TOL, (e, key, a, b)
    assert a["history"][e]["step"] == b["history"][e]["step"]
  assert abs(a["test_loss"] - b["test_loss"]) < TOL
  assert abs(a["initial_val_loss"] - b["initial_val_loss"]) < TOL


def _assert_same_scalars(a: dict, b: dict, every_step: bool = True):
  """b's logged losses and monitor statistics equal a's at the same steps (and b logged at all
  of a's steps, when `every_step`); rates and timings aside."""
  timing = lambda tag: any(w in tag for w in ("per_s", "mfu", "time"))
  if every_step:
    assert {t for t in a if not timing(t)} == {t for t in b if not timing(t)}
  for tag, values in b.items():
    if timing(tag):
      continue
    if every_step:
      assert values.keys() == a[tag].keys(), tag
    for step, value in values.items():
      assert abs(value - a[tag][step]) <= TOL * max(1.0, abs(a[tag][step])), (tag, step)


def test_same_losses_and_statistics_on_1_2_4_devices_and_with_fsdp(runs):
  dp4, fsdp4 = runs["four"]["results"][:2]
  dp2, dp1 = runs["two"]["results"][0], runs["one"]["results"][0]
  assert (runs["four"]["devices"], runs["two"]["devices"], runs["one"]["devices"]) == (4, 2, 1)
  assert dp4["history"][-1]["val_loss"] < dp4["initial_val_loss"] - 0.3  # it did learn
  for other in (fsdp4, dp2, dp1):
    _assert_same_run(dp4, other)
  scalars = runs["scalars"]
  # The logged train losses every 5 steps, gradient and weight norms every 8, per layer.
  assert len(scalars["dp4"]["train/loss"]) >= 7
  assert {"grad_norm/wte", "grad_norm_global/raw", "update_ratio/block_1/mlp",
          "weight_sample/wte/embedding/near_zero"} <= set(scalars["dp4"])
  for name in ("fsdp4", "dp2", "dp1"):
    _assert_same_scalars(scalars["dp4"], scalars[name])


def test_fsdp_shards_parameters_data_parallel_replicates(runs):
  dp4, fsdp4 = runs["four"]["results"][:2]
  assert set(dp4["specs"].values()) == {"P()"}
  # After every step: the out-shardings keep the state in its shards.
  assert fsdp4["specs"]["['wte']['embedding']"] == "P('fsdp', None)"   # (50304, 16)
  assert fsdp4["specs"]["['block_0']['attn']['qkv']['kernel']"] == "P(None, 'fsdp')"  # (16, 48)
  assert fsdp4["specs"]["['block_0']['mlp']['fc']['bias']"] == "P()"   # vectors stay whole
  # The final model, saved in shards from 4 devices, loads whole on 1.
  load = runs["one"]["results"][2]
  assert abs(load["checksum"] - fsdp4["checksum"]) < 1e-6 * fsdp4["checksum"]


def test_optimizer_state_is_sharded_like_its_parameter(runs):
  specs = runs["four"]["results"][4]
  for name, spec in (("['wte']['embedding']", "P('fsdp', None)"),
                     ("['block_1']['mlp']['fc']['kernel']", "P(None, 'fsdp')"),
                     ("['ln_f']['scale']", "P()")):
    same = {k: v for k, v in specs.items() if k.endswith(name)}
    assert len(same) == 3 and set(same.values()) == {spec}, same  # params, AdamW mu and nu
  assert specs[".step"] == "P()"


def test_zero1_shards_the_optimizer_state_only_and_trains_as_data_parallel(runs):
  # ZeRO-1 on 4 devices: the same run as plain data parallelism, with AdamW's moments split 4
  # ways along their largest axis that 4 divides and the parameters whole on every device.
  four = runs["four"]["results"]
  _assert_same_run(four[6], four[0])
  specs = four[7]
  for name, spec in (("['wte']['embedding']", "P(('data', 'fsdp'), None)"),
                     ("['block_1']['mlp']['fc']['kernel']", "P(None, ('data', 'fsdp'))"),
                     ("['ln_f']['scale']", "P()")):
    got = {k: v for k, v in specs.items() if k.endswith(name)}
    params = {k: v for k, v in got.items() if k.startswith(".params")}
    assert list(params.values()) == ["P()"], got   # whole on every device
    assert sorted(v for k, v in got.items() if k not in params) == [spec, spec], got  # mu, nu
  assert all(s == "P()" for s in four[6]["specs"].values())   # the final parameters


def test_norms_and_nonfinite_counts_over_shards_are_global(runs):
  r = runs["four"]["results"][3]
  assert r["specs"].count("P()") == 1   # the bias; both matrices are split 4 ways
  assert abs(r["global"] - r["global_host"]) < 1e-5 * r["global_host"]
  for layer, value in r["layer_host"].items():
    assert abs(r["layer"][layer] - value) < 1e-5 * value
  assert r["sanity"] == {"loss": 1, "grads": {"wte": 3, "block_0/mlp": 1},
                         "params": {"wte": 3, "block_0/mlp": 1}}


def test_kernels_run_per_shard_and_equal_xla_on_4_devices(runs):
  # Data 2 x fsdp 2: every Pallas kernel runs on its device's rows under shard_map (LayerNorm
  # forward and backward in 5 places, the GELU backward in 2 blocks, the loss, evaluation's
  # logsumexp), with the same loss, gradients and per-token losses as the plain block in XLA.
  got = runs["four"]["results"][5]
  assert abs(got["loss"][0] - got["loss"][1]) <= 1e-5 * abs(got["loss"][1])
  assert got["grads_rel"] < 1e-4 and got["token_losses_rel"] < 1e-5
  assert got["pallas_calls"] >= 5 + 5 + 2 + 1 + 1 and got["shard_maps"] >= got["pallas_calls"]


def test_snapshot_from_4_devices_resumes_on_2_and_1(runs):
  fsdp4 = runs["four"]["results"][1]
  epoch1_end = fsdp4["history"][0]["step"]
  for name in ("resume2", "resume1"):
    resumed = runs["two" if name == "resume2" else "one"]["results"][1]
    assert len(resumed["history"]) == 2
    _assert_same_run(fsdp4, resumed)
    scalars = runs["scalars"][name]
    assert min(scalars["train/loss"]) >= epoch1_end and set(scalars["val/loss"]) == {
        2 * epoch1_end}   # it went on from the snapshot, not from the start
    _assert_same_scalars(runs["scalars"]["fsdp4"], scalars, every_step=False)


def test_two_processes_train_together(runs):
  p0, p1 = (r["results"][0] for r in runs["pair"])
  assert [r["process"] for r in runs["pair"]] == [0, 1]
  # One final model, named by process 0 (two clocks a second apart named two and hung).
  assert p0["model_path"] == p1["model_path"]
  assert [r["results"][1] for r in runs["pair"]] == ["process 0", "process 0"]
  assert [r["devices"] for r in runs["pair"]] == [4, 4]
  assert p0["history"] == p1["history"] and p0["test_loss"] == p1["test_loss"]
  _assert_same_run(runs["four"]["results"][0], p0)
  _assert_same_scalars(runs["scalars"]["dp4"], runs["scalars"]["two_procs"])


def test_batch_size_must_split_over_devices(runs):
  error = runs["four"]["results"][2]["error"]
  assert error.startswith("batch_size: 6 ") and "4 devices" in error and "1.5" in error


@pytest.mark.parametrize("data,fsdp,n,expected", [
    (-1, 1, 4, (4, 1)), (-1, 2, 4, (2, 2)), (2, -1, 4, (2, 2)), (-1, -1, 4, (1, 4)),
    (1, 1, 1, (1, 1)), (2, 2, 8, None), (-1, 3, 4, None), (3, -1, 4, None)])
def test_mesh_shape(data, fsdp, n, expected):
  config = base_config()
  config.update(mesh_data=data, mesh_fsdp=fsdp)
  if expected is None:
    with pytest.raises(ConfigError, match=r"^mesh_(data|fsdp): "):
      sharding.mesh_shape(config, n)
  else:
    assert sharding.mesh_shape(config, n) == expected


def test_weight_spec():
  P = jax.sharding.PartitionSpec
  assert sharding.weight_spec((50304, 768), 8) == P("fsdp", None)
  assert sharding.weight_spec((768, 2304), 8) == P(None, "fsdp")
  assert sharding.weight_spec((768, 768), 8) == P("fsdp", None)     # ties: the first axis
  assert sharding.weight_spec((50257, 768), 8) == P(None, "fsdp")   # the largest does not divide
  assert sharding.weight_spec((7, 9), 2) == P()                     # none divides
  assert sharding.weight_spec((768,), 8) == P()                     # vectors stay whole
  assert sharding.weight_spec((768, 768), 1) == P()


def test_single_process_leaves_distributed_alone(monkeypatch):
  for var in ("SLURM_PROCID", "OMPI_COMM_WORLD_SIZE"):
    monkeypatch.delenv(var, raising=False)
  assert not sharding.initialize_distributed(base_config())


if __name__ == "__main__":
  _driver(json.loads(sys.argv[1]))
