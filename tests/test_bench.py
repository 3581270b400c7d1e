"""gptjax.bench on the CPU: each mode runs a shrunken config end to end and reports consistent
figures; the bf16-friendly cross-entropy of gptjax.step equals optax's."""
import importlib.util
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import REPO
from gptjax import bench, cli, kernels, plan, step
from gptjax.config import TOKENIZER_VOCAB
from gptjax.model import count_params

SHRUNK = ["--config.d_model=32", "--config.num_heads=2", "--config.num_layers=1",
          "--config.d_ff=64", "--config.max_seq_len=16", "--steps", "2", "--repeats", "2",
          "--warmup", "1"]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_evaluation_loss_kernel_matches_optax(dtype, monkeypatch):
  # Evaluation's per-token loss with the plan's loss_kernel: the logsumexp as gptjax.kernels'
  # Pallas kernel (here in its interpreter), blocks small enough for several per row.
  monkeypatch.setattr(kernels, "LSE_BLOCK", 256)
  k1, k2 = jax.random.split(jax.random.key(0))
  logits = (3 * jax.random.normal(k1, (3, 5, 2125))).astype(dtype)
  targets = jax.random.randint(k2, (3, 5), 0, 2125)
  plain = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
  np.testing.assert_allclose(step.cross_entropy(logits, targets, kernel=True), plain, rtol=1e-6)
  np.testing.assert_allclose(step.cross_entropy(logits, targets), plain, rtol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_head_loss_matches_optax(dtype, monkeypatch):
  # The training loss on one GPU: the tied output head and the cross-entropy, d(logits) left
  # unnormalized by the Pallas kernel (here in its interpreter, with blocks small enough for several
  # per row and a partial last one) and normalized in the head's backward matmuls.
  monkeypatch.setattr(kernels, "DEFER_BLOCK", 512)
  kx, kw, kt = jax.random.split(jax.random.key(3), 3)
  x = jax.random.normal(kx, (15, 24)).at[1, 0].set(10.0).at[2, 1:3].set(10.0)
  w = 0.3 * jax.random.normal(kw, (2125, 24))
  # Rows whose later blocks exceed the first block's max by more than DEFER_LIMIT, so that the
  # kernel redoes them: row 1 from its third block, its target in the fourth; row 2 from its
  # second block, which holds its target, with blocks of still larger logits after it.
  w = w.at[1500:1800, 0].set(6.0).at[600:1000, 1].set(4.0).at[1900:, 2].set(9.0)
  x, w = x.astype(dtype), w.astype(dtype)
  targets = jax.random.randint(kt, (15,), 0, 2125).at[1].set(1700).at[2].set(900)

  def plain(x, w):   # optax's cross-entropy of the same logits (rounded to dtype), in float32
    logits = (x @ w.T).astype(jnp.float32)
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, targets))

  loss, grads = jax.value_and_grad(step.head_loss, (0, 1))(x, w, targets)
  ref_loss, ref_grads = jax.value_and_grad(plain, (0, 1))(x, w)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
  for g, ref in zip(grads, ref_grads):
    assert g.dtype == dtype
    err = float(jnp.linalg.norm(g.astype(jnp.float32) - ref.astype(jnp.float32)))
    assert err <= (1e-5 if dtype == jnp.float32 else 0.01) * float(jnp.linalg.norm(ref))
  # A scaled loss scales the gradients too.
  scaled = jax.grad(lambda x, w: step.head_loss(x, w, targets) / 4, (0, 1))(x, w)
  for g, g4 in zip(grads, scaled):
    np.testing.assert_allclose(g4.astype(jnp.float32), g.astype(jnp.float32) / 4, rtol=1e-5)


def test_pallas_logsumexp_matches_jax():
  x = 30 * jax.random.normal(jax.random.key(1), (4, 3, 1000))
  x = x.at[0, 0].set(-jnp.inf).at[0, 0, 7].set(5.0)   # a row of -inf but one entry
  x = x.at[1, 1, ::2].set(-jnp.inf)
  np.testing.assert_allclose(kernels.logsumexp(x.reshape(12, 1000)),
                             jax.nn.logsumexp(x, axis=-1).reshape(12), rtol=1e-6)
  assert float(kernels.logsumexp(jnp.full((1, 8), -jnp.inf))[0]) == -np.inf


def test_pallas_logsumexp_carries_a_row_of_minus_inf_into_later_blocks(monkeypatch):
  monkeypatch.setattr(kernels, "LSE_BLOCK", 128)
  x = 30 * jax.random.normal(jax.random.key(2), (3, 1000))
  x = x.at[0, :300].set(-jnp.inf).at[1, 500:].set(-jnp.inf).at[2].set(-jnp.inf)
  np.testing.assert_allclose(kernels.logsumexp(x), jax.nn.logsumexp(x, axis=-1), rtol=1e-6)


def test_step_row_in_its_own_process(tmp_path, capsys):
  out = tmp_path / "bench.json"
  args = SHRUNK + ["--batch_sizes", "2", "--profile", str(tmp_path / "prof"), "--json", str(out)]
  assert bench.main(args) == 0
  (row,) = json.loads(out.read_text())["rows"]
  assert row["label"] == "config b2" and row["device"].endswith("(cpu)")
  assert row["ms_min"] <= row["ms_per_step"] <= row["ms_max"] and row["compile_s"] > 0
  assert row["tokens_per_s"] == pytest.approx(2 * 16 / (row["ms_per_step"] / 1e3))
  config, _, _, _ = cli.parse(["bench"] + SHRUNK[:5])
  n = count_params(plan.model_config(config, TOKENIZER_VOCAB["gpt2"],
                                    plan.resolve(config, "cpu", 1)))
  assert row["n_params"] == n and row["flops_per_token"] == 6 * n + 12 * 1 * 16 * 32
  assert row["mfu"] == pytest.approx(row["tokens_per_s"] * row["flops_per_token"] / 989e12)
  assert np.isfinite(row["last_loss"]) and row["profile"]["device_busy_ms_per_step"] > 0
  parts = row["profile"]["parts_ms_per_step"]  # the profile says which part of the step took it
  assert {"MLP forward", "LayerNorm backward", "loss forward", "output head backward",
          "optimizer and update"} <= set(parts)
  assert sum(parts.values()) == pytest.approx(row["profile"]["device_busy_ms_per_step"])
  assert "config b2" in capsys.readouterr().out.splitlines()[-1]  # the table comes last


def test_loop_compares_the_trainer_with_the_bare_step(corpus, token_cache, tmp_path):
  out = tmp_path / "loop.json"
  args = SHRUNK + ["--batch_sizes", "4", "--loop", "--noisolate", "--dataset", corpus,
                   f"--config.data_cache_dir={token_cache}", "--config.max_samples=80",
                   "--epochs", "1", "--config.log_interval=4", "--config.eval_batch_size=64",
                   "--config.sample_prompts=", "--json", str(out)]
  assert bench.main(args) == 0
  (row,) = json.loads(out.read_text())["rows"]
  assert row["loop_status"] == "completed" and row["loop_steps_timed"] >= 4
  ratio = row["loop_tokens_per_s"] / row["tokens_per_s"]
  assert row["loop_vs_step"] == pytest.approx(ratio)
  assert (row["loop_interval_tokens_per_s_min"] <= row["loop_interval_tokens_per_s_median"]
          <= row["loop_interval_tokens_per_s_max"])


def test_save_stall(tmp_path):
  out = tmp_path / "save.json"
  args = SHRUNK + ["--batch_sizes", "2", "--save_stall", "--noisolate", "--json", str(out)]
  assert bench.main(args) == 0
  (row,) = json.loads(out.read_text())["rows"]
  assert row["save_call_ms"] > 0 and row["snapshot_bytes"] > 4 * row["n_params"]
  assert np.isfinite(row["stall_ms_per_save"])


def test_clock_summary_of_nvidia_smi_samples():
  lines = ["0, 1500, 1980, 690.12, 700.00, 0x0000000000000004",
           "1, 1980, 1980, 120.00, 700.00, 0x0000000000000000",   # another card
           "0, 1700, 1980, 650.00, 700.00, 0x0000000000000000",
           "0, [N/A], 1980, 650.00, 700.00, 0x0",                  # skipped
           "0, 1600, 1980, 700.00, 700.00, 0x0000000000000080"]
  c = bench.summarize_clocks(lines, devices={0})
  assert c == {"sm_clock_mhz": 1600, "sm_clock_max_mhz": 1980, "power_w": 690.12,
               "power_limit_w": 700, "samples": 3, "power_capped": pytest.approx(2 / 3)}
  assert bench.summarize_clocks(lines)["samples"] == 4
  assert bench.summarize_clocks(["Field is not a valid field to query."]) is None


def test_clock_sampler_reads_nvidia_smi_while_its_block_runs(tmp_path):
  # A stand-in for nvidia-smi (there is no GPU here) that answers as the real one does.
  fake = tmp_path / "nvidia-smi"
  fake.write_text("#!/bin/sh\nwhile true; do echo '0, 1410, 1980, 698.50, 700.00, 0x4'; "
                  "sleep 0.05; done\n")
  fake.chmod(0o755)
  with bench.ClockSampler(period_ms=50, command=str(fake), force=True) as sampler:
    time.sleep(0.5)
  c = sampler.summary
  assert c["samples"] >= 2 and c["sm_clock_mhz"] == 1410 and c["power_capped"] == 1.0
  with bench.ClockSampler(command=str(fake)) as off:   # on CPU: nothing sampled
    pass
  assert off.summary is None
  row = {"mode": "step", "tokens_per_s": 1e5, "ms_per_step": 1.0, "ms_min": 1.0, "ms_max": 1.0,
         "mfu": 0.5, "compile_s": 1.0, "peak_bytes": None, "gpu_clocks": c}
  assert "SM clock 1,410 of 1,980 MHz, 698 of 700 W, at the power limit in 100%" in (
      bench.format_row(row, 989))


def test_rows_are_the_product_of_the_axes():
  args, rest = bench.build_parser().parse_known_args(
      ["--presets", "tiny,small", "--batch_sizes", "4,8", "--vary", "dropout=0,0.1",
       "--monitors", "off,5"])
  rows = bench.expand_rows(args, rest)
  assert len(rows) == 16
  label, config = rows[0]
  assert label == "tiny b4 dropout=0.0 monitors=off"
  assert (config.batch_size, config.dropout, config.weight_monitor) == (4, 0.0, False)
  label, config = rows[-1]
  assert label == "small b8 dropout=0.1 monitors=5" and config.d_model == 512
  assert config.gradient_monitor and config.sanity_check_interval == 5
  args, rest = bench.build_parser().parse_known_args(["--presets", "tiny:256,medium",
                                                      "--batch_sizes", "32,64"])
  assert [label for label, _ in bench.expand_rows(args, rest)] == [
      "tiny b256", "medium b32", "medium b64"]


@pytest.mark.parametrize("bad", [["--vary", "nope=1"], ["--vary", "dropout=high"],
                                 ["--monitors", "sometimes"], ["--batch_sizes", "0"],
                                 ["--presets", "huge"], ["--presets", "tiny:x"],
                                 ["--steps", "0"]])
def test_bad_input_exits_2(bad, capsys):
  with pytest.raises(SystemExit) as e:
    bench.main(bad)
  assert e.value.code == 2 and capsys.readouterr().err.startswith("error: ")


def test_part_of_a_gpu_kernel():
  assert bench.kernel_part("logsumexp_rows") == "loss forward"
  assert bench.kernel_part("layer_norm_bwd__2") == "LayerNorm backward"   # compiled twice
  assert bench.kernel_part("bias_gelu_grad") == "MLP backward"
  assert bench.kernel_part("softmax_cross_entropy_deferred") == "loss (forward and backward)"
  assert bench.kernel_part("input_reduce_fusion_3",
                           "jit(train_step)/transpose(jvp(GPT))/ln_f/mul") == "LayerNorm backward"
  assert bench.kernel_part("nvjet_sm90_tst_128x128_64x6") == "matmul (not attributed)"


def test_hidden_collective_time_is_the_overlap_with_compute():
  # A collective from 10 to 30 on one stream; compute kernels on others from 0 to 12, 15 to 18
  # and 16 to 25 (overlapping each other), and one from 40 to 50: 2 + 3 + 7 = 12 of its 20 hidden.
  assert bench.hidden_time([(10, 30)], [(0, 12), (15, 18), (16, 25), (40, 50)]) == (20, 12)
  # Two collectives that overlap each other count once; none running: nothing hidden.
  assert bench.hidden_time([(0, 10), (5, 20), (30, 35)], [(8, 31)]) == (25, 13)
  assert bench.hidden_time([], [(0, 5)]) == (0, 0)
  summary = {"wall_ms_per_step": 10.0, "device_busy_ms_per_step": 9.0, "kernels_per_step": 5,
             "categories_ms_per_step": {"matmul": 6.0, "collectives (NCCL)": 3.0},
             "parts_ms_per_step": {}, "top_kernels": [],
             "collectives_ms_per_step_per_device": 3.0,
             "collectives_hidden_ms_per_step_per_device": 2.25}
  assert ("collectives per device: 3.00 ms/step, 2.25 ms (75%) hidden behind compute, 0.75 ms "
          "exposed") in bench.format_profile("x", summary)


def test_idle_time_is_where_no_kernel_runs_on_any_stream():
  # a 0-10, b 12-20 with c 15-30 on another stream, d 100-110: idle 2 (a..b) and 70 (c..d);
  # the gap after the overlap is named after c, the kernel that ended last.
  idle, gaps = bench.idle_gaps([(12, 20, "b"), (0, 10, "a"), (100, 110, "d"), (15, 30, "c")])
  assert idle == 72 and gaps == [(70, "c", "d"), (2, "a", "b")]
  assert bench.idle_gaps([(0, 5, "a")]) == (0.0, [])
  summary = {"wall_ms_per_step": 10.0, "device_busy_ms_per_step": 9.0, "kernels_per_step": 5,
             "categories_ms_per_step": {}, "parts_ms_per_step": {}, "top_kernels": [],
             "idle_ms_per_step_per_device": 1.5, "stalls_per_step_per_device": 2,
             "stalls_ms_per_step_per_device": 1.2,
             "largest_stalls": [{"us": 900.0, "after": "fusion_1", "before": "nvjet_x"}]}
  text = bench.format_profile("x", summary)
  assert ("idle between kernels per device: 1.50 ms/step, of it 1.20 ms in 2 gaps of 20 us or "
          "more; the largest:\n         900 us after fusion_1, before nvjet_x") in text


def test_model_part_of_an_hlo_op():
  part = lambda op: bench.model_part("jit(train_step)/" + op)
  assert part("transpose(jvp(GPT))/block_11/mlp/fc/reduce_sum") == "MLP backward"
  assert part("jvp(GPT)/block_0/ln2/convert_element_type") == "LayerNorm forward"
  assert part("jvp(GPT)/block_3/attn/qkv/add") == "attention forward"
  assert part("jvp(GPT)/block_3/add") == "residual adds forward"
  assert part("transpose(jvp(GPT))/ln_f/reduce_sum") == "LayerNorm backward"
  assert part("jvp(GPT)/dot_general") == "output head forward"
  assert part("transpose(jvp())/convert_element_type") == "loss backward"
  assert part("cond/branch_1_fun/reduce_sum") == "monitors"
  assert part("jit(_where)/select_n") == "optimizer and update"
  names = bench.hlo_op_names(
      '  %loop_add_fusion.2 = bf16[8]{0} fusion(%p), kind=kLoop, '
      'metadata={op_name="jit(train_step)/jvp(GPT)/block_0/attn/qkv/add" stack_frame_id=1}')
  assert names["loop_add_fusion_2"] == names["loop_add_fusion.2"]  # GPU kernels use '_'


def test_best_batch_size_per_config():
  def row(label, batch, tps):
    return {"label": label, "mode": "step", "batch_size": batch, "tokens_per_s": tps, "mfu": 0.4}
  rows = [row("medium b32", 32, 480e3), row("medium b64", 64, 495e3),
          {"label": "medium b128", "batch_size": 128, "error": "out of memory at batch 128"},
          row("medium b32 dropout=0.1", 32, 440e3), row("medium b64 dropout=0.1", 64, 430e3),
          row("tiny b256", 256, 2.5e6)]
  best = bench.best_batches(rows)
  assert {k: (b["batch_size"], tried) for k, (b, tried) in best.items()} == {
      "medium": (64, [32, 64]), "medium dropout=0.1": (32, [32, 64])}
  text = bench.format_best(rows, 989.0)
  assert "best batch size for medium: 64 (495,000 tok/s" in text and "tiny" not in text


def _bench_script(name):
  """bench/<name>.py, imported as a module."""
  spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "bench", f"{name}.py"))
  script = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(script)
  return script


def test_block_kernel_benchmark_script_agrees_with_xla():
  script = _bench_script("block_kernels")
  results = script.main(["--rows", "40", "--d", "48", "--ff", "96", "--calls", "1"])
  passes = ("LayerNorm forward", "LayerNorm backward", "GELU backward")
  assert {name.split(",")[0] for name in results} == set(passes)
  for name in passes:
    pallas = [err for label, (_, err) in results.items() if label.startswith(name + ", Pallas")]
    # bf16 results (the bias gradient summed from bf16 in XLA, from float32 in the kernel):
    # within a few of their rounding steps, relative to the largest value
    assert len(pallas) == 1 and pallas[0] < 0.02


def test_loss_kernel_benchmark_script_agrees_with_xla():
  script = _bench_script("loss_kernels")
  results = script.main(["--rows", "8", "--vocab", "2500", "--calls", "1"])
  assert set(results) == {"logsumexp, XLA", "logsumexp, Pallas", "d(logits), XLA", "deferred"}
  assert results["logsumexp, XLA"][1] < 1e-4 and results["logsumexp, Pallas"][1] < 1e-4
  # d(logits) is written in bf16: off from the float32 reference by at most its rounding.
  assert results["d(logits), XLA"][1] < 1e-2
  assert results["deferred"][1] < 1e-2 / 8   # d(mean loss): the gradient over 8 rows
