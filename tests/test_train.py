"""End to end: a shrunken GPT trains on real WikiText text, writes the guide's layout, reloads."""
import json
import os

import jax
import numpy as np

from gptjax import checkpoint, data, evaluate, trainer
from gptjax.model import GPT, ModelConfig
from gptjax.step import make_eval_step


def test_loss_falls_and_outputs_reload(tiny_config):
  config = tiny_config
  config.epochs = 3
  result = trainer.train_and_evaluate(config)
  history = result["history"]
  assert result["status"] == "completed" and len(history) == 3
  assert result["step"] >= 250
  val = [h["val_loss"] for h in history]
  first = result["initial_val_loss"]          # measured before the first step
  assert abs(first - np.log(50257)) < 0.5      # an untrained model guesses nearly uniformly
  assert max(val) < first - 2.5, (first, val)  # every epoch is far below it
  assert history[-1]["train_loss"] < history[0]["train_loss"] - 0.5

  run = config.output_dir
  assert sorted(os.listdir(run)) == [".lock", "logs", "models", "run_config.json", "tensorboard"]
  (log_name,) = os.listdir(os.path.join(run, "logs"))
  assert log_name.startswith("train_") and log_name.endswith("_GMT+00.log")
  log = open(os.path.join(run, "logs", log_name)).read()
  for needle in ("Device: cpu", "parameters", "tokens per epoch", "val ppl", "tok/s", "ETA",
                 "Test loss", "Final model saved to"):
    assert needle in log, needle
  assert os.listdir(os.path.join(run, "tensorboard"))
  with open(os.path.join(run, "run_config.json")) as f:
    assert json.load(f)["d_model"] == 32
  assert not os.path.exists(os.path.join(run, "snapshots"))  # deleted after training

  # The final model is self-describing and gives the same validation loss.
  (model_dir,) = os.listdir(os.path.join(run, "models"))
  params, info = checkpoint.load_params(os.path.join(run, "models", model_dir))
  arch = dict(info["model"])
  arch["dtype"] = np.dtype(arch["dtype"])
  model = GPT(ModelConfig(**arch))
  tokens = data.load_tokens(config.dataset, "valid", info["tokenizer"],
                            cache_dir=config.data_cache_dir)
  reloaded = evaluate.mean_loss(make_eval_step(model), jax.device_put(params), tokens,
                              arch["max_seq_len"], config.batch_size)
  assert abs(reloaded - val[-1]) < 1e-5
  assert abs(info["test_loss"] - result["test_loss"]) < 1e-9
