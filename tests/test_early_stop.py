"""Scripted loss sequences through gptjax.early_stop: when it stops, what it tracks, its JSON;
and through the trainer: the epoch it stops at, the weights it keeps, what it logs and saves."""
import json
import math
import types

import pytest

from gptjax import early_stop
from gptjax.early_stop import EarlyStopState
from conftest import read_run_log, same_tree


def make_config(**overrides):
  fields = dict(early_stopping=True, early_stop_patience=3, early_stop_min_delta=0.001,
                early_stop_restore_best=True, early_stop_overfit_patience=0,
                early_stop_overfit_min_delta=0.01)
  fields.update(overrides)
  return types.SimpleNamespace(**fields)


def run(config, val_losses, train_losses=None):
  """Feeds epochs 1, 2, ... until stopped; returns (states, improved flags)."""
  if train_losses is None:
    train_losses = val_losses  # gap 0 every epoch: overfit criterion never fires
  state = EarlyStopState()
  states, flags = [], []
  for epoch, (val, train) in enumerate(zip(val_losses, train_losses), start=1):
    state, improved = early_stop.update(state, config, epoch, val, train)
    states.append(state)
    flags.append(improved)
    if state.stopped:
      break
  return states, flags


def stop_epoch(states):
  for epoch, s in enumerate(states, start=1):
    if s.stopped:
      return epoch
  return None


def test_patience_stops_at_exact_epoch_with_min_delta():
  states, flags = run(make_config(), [5.0, 4.0, 3.9995, 3.9996, 3.9994, 1.0])
  assert stop_epoch(states) == 5
  assert flags == [True, True, False, False, False]
  last = states[-1]
  assert last.best_val_loss == 4.0 and last.best_epoch == 2
  assert last.epochs_without_improvement == 3
  assert last.reason == (
      "validation loss did not improve by 0.001 for 3 epochs (best 4.0000 at epoch 2)")


def test_improvement_resets_patience_and_tracks_best():
  vals = [5.0, 4.0, 4.1, 4.2, 3.5, 3.6, 3.7, 3.8]
  states, flags = run(make_config(), vals)
  assert flags == [True, True, False, False, True, False, False, False]
  assert [s.epochs_without_improvement for s in states] == [0, 0, 1, 2, 0, 1, 2, 3]
  assert [s.best_epoch for s in states] == [1, 2, 2, 2, 5, 5, 5, 5]
  assert stop_epoch(states) == 8
  assert states[-1].best_val_loss == 3.5
  assert "(best 3.5000 at epoch 5)" in states[-1].reason


def test_decrease_smaller_than_min_delta_does_not_move_best():
  # Keras semantics: a decrease below min_delta is not an improvement, so best stays where it was
  # and later small decreases are still measured against it.
  states, flags = run(make_config(early_stop_patience=10), [2.0, 1.9995, 1.9992, 1.9985])
  assert flags == [True, False, False, True]
  assert states[-1].best_val_loss == 1.9985 and states[-1].best_epoch == 4


def test_patience_one_stops_on_first_non_improvement():
  states, _ = run(make_config(early_stop_patience=1), [3.0, 2.0, 2.5, 1.0])
  assert stop_epoch(states) == 3


def test_nan_validation_loss_is_not_an_improvement():
  states, flags = run(make_config(early_stop_patience=2), [float("nan"), float("nan"), 1.0])
  assert flags == [False, False]
  assert stop_epoch(states) == 2
  assert states[-1].best_epoch == -1 and states[-1].best_val_loss == math.inf
  assert "no finite validation loss yet" in states[-1].reason


def test_overfit_stops_at_exact_epoch():
  config = make_config(early_stopping=False, early_stop_overfit_patience=3)
  vals = [3.0, 2.9, 2.9, 2.95, 3.0, 3.1]
  trains = [3.0, 2.8, 2.7, 2.6, 2.5, 2.4]
  # gaps: 0.0, 0.1, 0.2, 0.35, 0.5, 0.7 -> growth at epochs 2..6 (each > 0.01)
  states, _ = run(config, vals, trains)
  assert stop_epoch(states) == 4
  assert [s.gap_growth_streak for s in states] == [0, 1, 2, 3]
  assert states[-1].reason == (
      "the validation-train gap grew by more than 0.01 for 3 epochs in a row (gap 0.350)")


def test_overfit_streak_resets_when_gap_stops_growing():
  config = make_config(early_stopping=False, early_stop_overfit_patience=3)
  gaps = [0.0, 0.1, 0.2, 0.15, 0.3, 0.4, 0.5]
  vals = [3.0] * len(gaps)
  trains = [3.0 - g for g in gaps]
  states, _ = run(config, vals, trains)
  assert [s.gap_growth_streak for s in states] == [0, 1, 2, 0, 1, 2, 3]
  assert stop_epoch(states) == 7


def test_overfit_growth_below_min_delta_never_stops():
  config = make_config(early_stopping=False, early_stop_overfit_patience=2,
                       early_stop_overfit_min_delta=0.01)
  # The gap grows every epoch, but by 0.005 < 0.01.
  gaps = [0.1 + 0.005 * i for i in range(20)]
  states, _ = run(config, [3.0] * 20, [3.0 - g for g in gaps])
  assert stop_epoch(states) is None
  assert all(s.gap_growth_streak == 0 for s in states)


def test_overfit_ignores_patience_when_early_stopping_off():
  # Validation loss is flat (patience would fire at epoch 4) but only the overfit criterion is on.
  config = make_config(early_stopping=False, early_stop_overfit_patience=3)
  states, flags = run(config, [2.0] * 10)
  assert stop_epoch(states) is None
  assert flags[0] and not any(flags[1:])
  assert states[-1].epochs_without_improvement == 9


def test_patience_fires_before_overfit_when_both_due():
  config = make_config(early_stop_patience=2, early_stop_overfit_patience=2)
  states, _ = run(config, [2.0, 2.0, 2.0], [2.0, 1.9, 1.8])
  assert stop_epoch(states) == 3
  assert states[-1].reason.startswith("validation loss did not improve")


def test_disabled_never_stops_but_tracks_best():
  config = make_config(early_stopping=False, early_stop_overfit_patience=0)
  vals = [5.0, 4.0] + [4.5 + 0.1 * i for i in range(30)]
  trains = [5.0, 3.9] + [3.0 - 0.1 * i for i in range(30)]
  states, flags = run(config, vals, trains)
  assert len(states) == len(vals)
  assert not any(s.stopped for s in states)
  assert flags[:2] == [True, True] and not any(flags[2:])
  assert states[-1].best_val_loss == 4.0 and states[-1].best_epoch == 2
  assert states[-1].reason == ""


def test_stopped_state_keeps_first_reason():
  config = make_config(early_stop_patience=2)
  state = EarlyStopState()
  for epoch, val in enumerate([3.0, 3.0, 3.0], start=1):
    state, _ = early_stop.update(state, config, epoch, val, val)
  reason = state.reason
  assert state.stopped
  state, improved = early_stop.update(state, config, 4, 1.0, 1.0)
  assert improved and state.stopped and state.reason == reason
  assert state.best_epoch == 4


def test_update_does_not_mutate_input_state():
  state = EarlyStopState()
  new, _ = early_stop.update(state, make_config(), 1, 2.0, 1.0)
  assert state == EarlyStopState()
  assert new is not state
  with pytest.raises(AttributeError):
    new.best_epoch = 7  # frozen


def test_config_missing_fields_use_defaults():
  # Only early_stopping given: patience 5, min_delta 0.001, overfit off.
  config = types.SimpleNamespace(early_stopping=True)
  states, _ = run(config, [1.0] + [1.0] * 10)
  assert stop_epoch(states) == 6


def test_project_config_defaults_are_disabled():
  from gptjax.config import base_config
  config = base_config()
  states, flags = run(config, [3.0] * 20, [1.0 + 0.1 * i for i in range(20)])
  assert stop_epoch(states) is None and flags[0] and not any(flags[1:])
  config.early_stopping = True
  states, _ = run(config, [3.0] * 20)
  assert stop_epoch(states) == 1 + config.early_stop_patience


def json_round_trip(state):
  return EarlyStopState.from_json(json.loads(json.dumps(state.to_json(), allow_nan=False)))


def test_json_round_trip_default_state_with_inf():
  state = EarlyStopState()
  encoded = state.to_json()
  json.dumps(encoded, allow_nan=False)  # strict JSON: no Infinity literal
  assert json_round_trip(state) == state
  assert json_round_trip(state).best_val_loss == math.inf
  assert json_round_trip(state).last_gap is None


def test_json_round_trip_mid_run_and_stopped_states_exactly():
  config = make_config(early_stop_patience=3, early_stop_overfit_patience=5)
  vals = [5.123456789012345, 4.1 / 3, 4.0, 4.0, 4.0]
  trains = [5.0, 1.0 / 7, 3.0, 2.9, 2.8]
  states, _ = run(config, vals, trains)
  assert states[-1].stopped
  for s in states:
    assert json_round_trip(s) == s


def test_json_round_trip_non_finite_gap():
  state = EarlyStopState(last_gap=-math.inf, best_val_loss=2.5, best_epoch=3)
  back = json_round_trip(state)
  assert back == state
  nan_state = EarlyStopState(last_gap=float("nan"))
  assert math.isnan(json_round_trip(nan_state).last_gap)


def test_resume_from_json_continues_identically():
  config = make_config(early_stop_patience=3)
  vals = [5.0, 4.0, 4.5, 4.4, 4.3, 4.2]
  straight, _ = run(config, vals)
  state = EarlyStopState()
  for epoch, val in enumerate(vals, start=1):
    state = json_round_trip(state)  # a snapshot written and read back between epochs
    state, _ = early_stop.update(state, config, epoch, val, val)
    if state.stopped:
      break
  assert state == straight[-1]
  assert stop_epoch(straight) == 5


def test_from_json_defaults_missing_and_rejects_unknown_fields():
  assert EarlyStopState.from_json({"best_epoch": 2, "best_val_loss": 1.5}) == EarlyStopState(
      best_epoch=2, best_val_loss=1.5)
  with pytest.raises(ValueError, match="unknown"):
    EarlyStopState.from_json({"bogus": 1})


# ----------------------------------------------------------------------------- through the trainer
# The real training runs; only the validation losses are scripted (evaluate.mean_loss replaced).

def scripted_evaluate(monkeypatch, config, val_losses):
  """Validation returns the next of `val_losses` (the first one is the before-training loss) and
  records the params it was given; the test split returns 1.0 and records the final params."""
  import jax
  import numpy as np
  from gptjax import data
  from gptjax import evaluate as evaluate_lib

  valid = np.asarray(data.load_tokens(config.dataset, "valid", config.tokenizer,
                                      cache_dir=config.data_cache_dir))
  calls = {"valid": [], "test": []}
  script = iter(val_losses)

  def evaluate(eval_step, params, tokens, *args, **kwargs):
    split = "valid" if len(tokens) == len(valid) and np.array_equal(tokens, valid) else "test"
    calls[split].append(jax.tree.map(np.array, jax.device_get(params)))  # copies: buffers are
    return next(script) if split == "valid" else 1.0                     # donated later

  monkeypatch.setattr(evaluate_lib, "mean_loss", evaluate)
  return calls


def short_run(config, **overrides):
  config.update(epochs=6, max_samples=30, dropout=0.0, weight_monitor=False, **overrides)
  return config


def test_trainer_stops_on_patience_and_keeps_best_epoch(tiny_config, monkeypatch, capsys):
  import os
  from gptjax import checkpoint, trainer
  config = short_run(tiny_config, early_stopping=True, early_stop_patience=2,
                     snapshot_interval=4, keep_last_n_snapshots=20,
                     delete_snapshots_after_training=False)
  calls = scripted_evaluate(monkeypatch, config, [11.0, 5.0, 4.0, 4.2, 4.1, 3.0, 2.0])
  result = trainer.train_and_evaluate(config)

  assert [h["val_loss"] for h in result["history"]] == [5.0, 4.0, 4.2, 4.1]  # stopped after 4
  assert len(calls["valid"]) == 5 and len(calls["test"]) == 1
  best, last = calls["valid"][2], calls["valid"][4]      # epochs 2 and 4 (0 is before training)
  assert not same_tree(best, last)
  assert same_tree(calls["test"][0], best)               # tested: the best epoch's weights
  params, _ = checkpoint.load_params(result["model_path"])
  assert same_tree(params, best)                         # and saved as the final model
  log = read_run_log(config.output_dir)
  assert ("Early stopping after epoch 4: validation loss did not improve by 0.001 for 2 epochs "
          "(best 4.0000 at epoch 2)") in log
  assert "Restored the best weights: epoch 2 (val loss 4.0000)" in log

  # The early-stopping state and the best weights travel in each snapshot (mid-epoch ones too).
  steps_per_epoch = result["step"] // 4
  steps = checkpoint.complete_steps(f"{config.output_dir}/snapshots")
  assert any(s % steps_per_epoch for s in steps)
  epoch3 = checkpoint.snapshot_path(f"{config.output_dir}/snapshots", 3 * steps_per_epoch)
  meta = checkpoint.read_meta(epoch3)
  assert meta["epoch"] == 3 and meta["index"] == 0
  saved_state = EarlyStopState.from_json(meta["early_stop"])
  assert (saved_state.best_val_loss, saved_state.best_epoch,
          saved_state.epochs_without_improvement, saved_state.stopped) == (4.0, 2, 1, False)
  import orbax.checkpoint as ocp
  with ocp.StandardCheckpointer() as ckpt:
    saved = ckpt.restore(os.path.join(epoch3, "state"))
  assert same_tree(saved["best"], best)

  # A resumed run reads the stopped state back and does not train on.
  config.update(resume=True, yes=True)
  capsys.readouterr()
  assert trainer.train_and_evaluate(config)["finished"]
  assert "early stop: validation loss did not improve" in capsys.readouterr().out


def test_trainer_stops_on_overfitting_and_keeps_best_epoch(tiny_config, monkeypatch):
  from gptjax import checkpoint, trainer
  config = short_run(tiny_config, early_stop_overfit_patience=2)
  # Validation falls far below its first value, then rises by 1 an epoch while the training
  # loss falls: the gap grows from epoch 3 on, so the second growth (epoch 4) stops the run.
  calls = scripted_evaluate(monkeypatch, config, [11.0, 10.0, 5.0, 6.0, 7.0, 8.0, 9.0])
  result = trainer.train_and_evaluate(config)

  history = result["history"]
  assert [h["val_loss"] for h in history] == [10.0, 5.0, 6.0, 7.0]
  state = EarlyStopState()
  for h in history:  # the real training losses give the same decision
    state, _ = early_stop.update(state, config, h["epoch"], h["val_loss"], h["train_loss"])
  assert state.stopped and state.gap_growth_streak == 2 and state.best_epoch == 2
  log = read_run_log(config.output_dir)
  assert f"Early stopping after epoch 4: {state.reason}" in log
  assert state.reason.startswith("the validation-train gap grew by more than 0.01 for 2 epochs")
  assert "Restored the best weights: epoch 2 (val loss 5.0000)" in log
  best, last = calls["valid"][2], calls["valid"][4]
  assert not same_tree(best, last)
  params, _ = checkpoint.load_params(result["model_path"])
  assert same_tree(params, best) and same_tree(calls["test"][0], best)
