"""`python -m gptjax.evaluate`: a saved model alone reproduces the trainer's validation and test
losses, from a final model and from a snapshot; bits per byte counts the split's real bytes.
The trained run also checks the samples the trainer logs at validation."""
import json
import math
import os

import pytest

from gptjax import evaluate, trainer
from conftest import read_run_log


def _evaluate(capsys, *args):
  evaluate.run(["evaluate", *args, "--json"])
  out = capsys.readouterr().out.strip().splitlines()
  assert len(out) == 1  # one machine-readable line
  return json.loads(out[0])


def test_evaluate_reproduces_the_trainers_losses_and_run_logs_samples(tiny_config, capsys):
  config = tiny_config
  # One run serves two checks: its samples at validation (the hook of gptjax.generate) too.
  config.update(epochs=1, delete_snapshots_after_training=False,
                sample_prompts="The game|In 1885 ,", sample_max_new_tokens=6)
  result = trainer.train_and_evaluate(config)
  capsys.readouterr()
  log = read_run_log(config.output_dir)
  assert "Sample 1 | 'The game" in log and "Sample 2 | 'In 1885 ," in log
  events = os.path.join(config.output_dir, "tensorboard")
  blob = b"".join(open(os.path.join(events, f), "rb").read() for f in os.listdir(events))
  assert b"samples/1" in blob and b"samples/2" in blob
  model = result["model_path"]
  cache = ["--data_cache_dir", config.data_cache_dir]

  # The dataset, tokenizer and architecture all come from the model directory.
  valid = _evaluate(capsys, "--model", model, "--split", "valid", *cache)
  assert abs(valid["loss"] - result["history"][-1]["val_loss"]) < 1e-5
  test = _evaluate(capsys, "--model", model, *cache, "--batch_size", "3")  # test is the default
  assert test["split"] == "test" and abs(test["loss"] - result["test_loss"]) < 1e-5
  assert math.isclose(test["perplexity"], math.exp(test["loss"]))

  # Bits per byte: over the UTF-8 bytes of the split's text, which the tokens decode back to.
  with open(os.path.join(config.dataset, "valid.txt"), "rb") as f:
    assert valid["bytes"] == len(f.read())
  assert math.isclose(valid["bits_per_byte"],
                      valid["loss"] * valid["tokens"] / math.log(2) / valid["bytes"])
  assert 0.5 < valid["bits_per_byte"] < 4

  # The epoch-end snapshot holds the same weights as the final model.
  snapshots = os.path.join(config.output_dir, "snapshots")
  (snapshot,) = [d for d in os.listdir(snapshots) if d.startswith("snapshot_")]
  from_snapshot = _evaluate(capsys, "--model", os.path.join(snapshots, snapshot),
                            "--split", "valid", *cache)
  assert abs(from_snapshot["loss"] - valid["loss"]) < 1e-6
  assert from_snapshot["tokens"] == valid["tokens"]

  evaluate.run(["evaluate", "--model", model, "--split", "valid", *cache])
  line = capsys.readouterr().out
  assert line.count("\n") == 1
  assert f"loss {valid['loss']:.4f}" in line and "ppl" in line and "bits/byte" in line


@pytest.mark.parametrize("args, message", [
    ([], "model: no model given"),
    (["--model", "/nonexistent/model_X"], "does not exist"),
    (["--model", "{tmp}"], "is not a gptjax model"),
    (["--model", "{tmp}", "--split", "dev"], "split"),
    (["--model", "{tmp}", "--batch_size=-1"], "batch_size"),
    (["--model", "{tmp}", "--bogus"], "bogus"),
])
def test_bad_input_is_one_line_exit_2(tmp_path, capsys, args, message):
  args = [a.replace("{tmp}", str(tmp_path)) for a in args]
  with pytest.raises(SystemExit) as e:
    evaluate.main(["evaluate", *args])
  assert e.value.code == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and message in err and err.count("\n") == 1
