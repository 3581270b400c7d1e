"""The execution plan: `auto` resolved once per backend and device count, each switch honoured,
impossible choices refused in one line, and the same program from the CLI and from Python."""
import re

import jax
import jax.numpy as jnp
import pytest

from gptjax import cli, plan, trainer
from gptjax.config import ConfigError, base_config

ALL_ON = dict(fused_block=True, block_kernels=True, loss_kernel=True, xla_gpu_epilogues=True)


def _resolve(backend, n_devices, **fields):
  config = base_config()
  config.update(fields)
  return plan.resolve(config, backend, n_devices)


@pytest.mark.parametrize("backend,n,want", [
    ("cpu", 1, dict(compute_dtype="float32", attention="xla")),
    ("cpu", 4, dict(compute_dtype="float32", attention="xla")),
    ("tpu", 8, dict(compute_dtype="bfloat16", attention="xla")),
    ("gpu", 1, dict(compute_dtype="bfloat16", attention="cudnn", **ALL_ON)),
    # Several GPUs keep every kernel (they run per shard) and overlap the collectives.
    ("gpu", 4, dict(compute_dtype="bfloat16", attention="cudnn", **ALL_ON,
                    xla_overlap_collectives=True)),
])
def test_auto_resolves_per_backend_and_device_count(backend, n, want):
  got = _resolve(backend, n)
  off = {f: False for f in plan.PLAN_SWITCHES}
  assert got.to_json() == {**off, **want}
  assert got.describe().startswith(f"Plan: compute {want['compute_dtype']}, attention "
                                   f"{want['attention']}, fused_block ")


def test_every_switch_turns_its_path_off_on_a_gpu():
  for field in plan.PLAN_SWITCHES:
    got = _resolve("gpu", 2, **{field: "off"})
    assert getattr(got, field) is False, field
    others = {f for f in plan.PLAN_SWITCHES if getattr(got, f)}
    # The fused block's kernels go with it; nothing else changes.
    expect = set(plan.PLAN_SWITCHES) - {field} - (
        {"block_kernels"} if field == "fused_block" else set())
    assert others == expect, field


def test_kernels_can_be_asked_for_on_the_cpu_and_say_so():
  got = _resolve("cpu", 1, fused_block="on", block_kernels="on")
  assert got.fused_block and got.block_kernels and not got.loss_kernel
  assert got.describe().endswith("(Pallas kernels in the interpreter: slow)")
  assert got.compiler_options() == {}


@pytest.mark.parametrize("fields,message", [
    (dict(fused_block="off", block_kernels="on"), "block_kernels: on needs fused_block on"),
    (dict(block_kernels="on"), "block_kernels: on needs fused_block on"),   # auto: off on a CPU
    (dict(xla_gpu_epilogues="on"), "xla_gpu_epilogues: on applies to GPUs only (backend cpu)"),
    (dict(attention="cudnn"), "attention: cudnn needs an NVIDIA GPU and compute_dtype bfloat16"),
    (dict(loss_kernel="yes"), "loss_kernel: 'yes' is not allowed; allowed: auto, on, off"),
])
def test_impossible_plans_are_one_line_naming_the_field(fields, message):
  with pytest.raises(ConfigError, match=re.escape(message)):
    _resolve("cpu", 1, **fields)


def test_check_only_refuses_a_kernel_without_the_fused_block(tmp_path, capsys):
  from gptjax import train
  from gptjax.config import SAMPLE_DIR
  with pytest.raises(SystemExit) as exit_:
    train.main(["train", "--dataset", SAMPLE_DIR, "--output_dir", str(tmp_path / "run"),
                "--fused_block", "off", "--block_kernels", "on", "--check_only"])
  assert exit_.value.code == 2
  assert capsys.readouterr().err.strip() == (
      "error: block_kernels: on needs fused_block on (the plain block uses flax's layers only); "
      "allowed with fused_block off: auto, off")
  assert not (tmp_path / "run").exists()


def test_check_only_refuses_a_plan_this_machine_cannot_run(tmp_path, capsys):
  from gptjax import train
  from gptjax.config import SAMPLE_DIR
  with pytest.raises(SystemExit) as exit_:
    train.main(["train", "--dataset", SAMPLE_DIR, "--output_dir", str(tmp_path / "run"),
                "--attention", "cudnn", "--check_only"])
  assert exit_.value.code == 2
  assert capsys.readouterr().err.startswith("error: attention: cudnn needs an NVIDIA GPU")


@pytest.mark.parametrize("backend,n", [("cpu", 1), ("gpu", 1), ("gpu", 4)])
def test_a_saved_models_programs_get_the_options_of_its_form(backend, n):
  # Evaluation and sampling of a saved model compile outside the train step: the options its
  # form needs come from its ModelConfig, as the run's plan gives them (less the collectives').
  got = _resolve(backend, n)
  mcfg = plan.model_config(base_config(), 50257, got)
  want = {k: v for k, v in got.compiler_options().items() if "xla_gpu_enable_latency" not in k
          and "combine_threshold" not in k}
  assert plan.model_compiler_options(mcfg, backend) == want
  assert bool(want) == (backend == "gpu")


def test_compiler_options_come_from_the_plan_not_the_environment(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "--xla_disable_hlo_passes=foo")
  assert _resolve("cpu", 1).compiler_options() == {}
  one = _resolve("gpu", 1).compiler_options()
  assert one == {"xla_disable_hlo_passes": "dot-merger", "xla_gpu_enable_cublaslt": True,
                 "xla_gpu_enable_triton_gemm": False}
  four = _resolve("gpu", 4).compiler_options()
  assert four["xla_gpu_enable_latency_hiding_scheduler"] and set(one) < set(four)
  assert _resolve("gpu", 4, xla_overlap_collectives="off").compiler_options() == one
  assert _resolve("gpu", 1, fused_block="off", xla_gpu_epilogues="off").compiler_options() == {}
  # XLA takes every option by name (an unknown one is an error), on any backend.
  jitted = jax.jit(lambda x: x + 1, compiler_options=four)
  assert float(jitted(jnp.float32(1))) == 2.0


def _step_jaxpr(config, backend, monkeypatch) -> tuple[str, dict]:
  """The train step's jaxpr and compiler options as trainer.build_training makes them."""
  monkeypatch.setattr(jax, "default_backend", lambda: backend)
  built = trainer.build_training(config, 50257, total_steps=10)
  batch = jnp.zeros((config.batch_size, config.max_seq_len + 1), jnp.int32)
  jaxpr = str(built.train_step.trace(built.state, batch, built.rng).jaxpr)
  return jaxpr, built.plan.compiler_options()


@pytest.mark.parametrize("backend", ["cpu", "gpu"])
def test_the_cli_and_python_build_the_same_step(backend, monkeypatch):
  # One config given as flags and as Python values: the same plan, the same jaxpr, the same
  # compiler options. "gpu": the GPU plan (its Pallas kernels traced for the interpreter here).
  flags = ["--d_model", "32", "--num_heads", "2", "--num_layers", "1", "--d_ff", "64",
           "--max_seq_len", "16", "--batch_size", "2", "--attention", "xla",
           "--compute_dtype", "float32"]
  from_cli, _, _, _ = cli.parse(["train"] + flags)
  from_python = base_config()
  from_python.update(d_model=32, num_heads=2, num_layers=1, d_ff=64, max_seq_len=16,
                     batch_size=2, attention="xla", compute_dtype="float32")
  cli_jaxpr, cli_options = _step_jaxpr(from_cli, backend, monkeypatch)
  py_jaxpr, py_options = _step_jaxpr(from_python, backend, monkeypatch)
  assert cli_jaxpr == py_jaxpr and cli_options == py_options
  assert ("pallas_call" in cli_jaxpr) == (backend == "gpu")
