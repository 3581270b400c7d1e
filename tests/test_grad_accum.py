"""Gradient accumulation: N micro-batches of B inside one compiled step are the step of N*B."""
import re

import jax
import numpy as np

from gptjax import data, trainer
from gptjax.config import ConfigError
from conftest import read_run_log


def run_steps(config, n_steps: int, batches):
  """The loss of each of `n_steps` optimizer steps on `batches`, and the final parameters."""
  training = trainer.build_training(config, 50257, total_steps=n_steps)
  state, losses = training.state, []
  for batch in batches[:n_steps]:
    state, metrics = training.train_step(state, jax.device_put(batch), training.rng)
    losses.append(float(metrics["loss"]))
  return losses, jax.device_get(state.params)


def test_four_micro_batches_of_four_equal_one_batch_of_sixteen(tiny_config):
  """float32 on the CPU: the same losses (relative 1e-6: a loss near 10.8 is 1 ulp from 1e-6) and
  parameters (absolute 1e-6) after several steps; only the summation order differs."""
  tiny_config.update(dropout=0.0, compute_dtype="float32", warmup_steps=2)
  tokens = data.load_tokens(tiny_config.dataset, "train", tiny_config.tokenizer,
                            cache_dir=tiny_config.data_cache_dir)
  windows = data.TrainWindows(tokens, tiny_config.max_seq_len, 16, tiny_config.seed)
  batches = [windows.batch(0, i) for i in range(4)]

  whole = tiny_config.copy_and_resolve_references()
  whole.update(batch_size=16, grad_accum_steps=1)
  micro = tiny_config.copy_and_resolve_references()
  micro.update(batch_size=4, grad_accum_steps=4)
  losses_whole, params_whole = run_steps(whole, 4, batches)
  losses_micro, params_micro = run_steps(micro, 4, batches)

  assert losses_whole[-1] < losses_whole[0]  # it trains
  np.testing.assert_allclose(losses_micro, losses_whole, rtol=1e-6, atol=0)
  diff = max(jax.tree.leaves(jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))),
                                          params_micro, params_whole)))
  print(f"losses {losses_whole} (16) vs {losses_micro} (4 x 4); max |param diff| {diff:.2e}")
  assert diff < 1e-6, diff


def test_the_run_counts_optimizer_steps_and_logs_the_effective_batch(tiny_config):
  tiny_config.update(batch_size=4, grad_accum_steps=2, epochs=1, max_samples=40)
  result = trainer.train_and_evaluate(tiny_config)
  log = read_run_log(tiny_config.output_dir)
  assert "in each of 2 micro-batches of 4; effective batch 8 sequences" in log
  steps = int(re.search(r"Training 1 epochs = (\d+) steps of 256 tokens", log).group(1))
  assert result["step"] == steps  # one step per 8 sequences of 33 tokens: the epoch's windows
  tokens = data.load_tokens(tiny_config.dataset, "train", tiny_config.tokenizer, 40,
                            tiny_config.data_cache_dir)
  assert steps == len(tokens) // 33 // 8


def test_grad_accum_steps_must_be_positive(tiny_config):
  import pytest
  tiny_config.grad_accum_steps = 0
  with pytest.raises(ConfigError, match="grad_accum_steps: 0 is not allowed"):
    trainer.check(tiny_config)


def test_micro_batches_take_the_memory_of_one(tiny_config):
  """XLA's own memory analysis of the compiled step: 4 micro-batches of 4 need about the
  temporary memory of one batch of 4, far from that of a batch of 16."""
  def temp_bytes(batch_size, n_micro):
    config = tiny_config.copy_and_resolve_references()
    config.update(batch_size=batch_size, grad_accum_steps=n_micro, dropout=0.0)
    training = trainer.build_training(config, 50257, total_steps=10)
    batch = jax.ShapeDtypeStruct((batch_size * n_micro, config.max_seq_len + 1), np.int32)
    compiled = training.train_step.lower(training.state, batch, training.rng).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  one, micro, whole = temp_bytes(4, 1), temp_bytes(4, 4), temp_bytes(16, 1)
  print(f"temporary memory: batch 4 {one:,} B, 4 x 4 {micro:,} B, batch 16 {whole:,} B")
  assert micro < 1.25 * one and micro < 0.5 * whole
