"""train_and_evaluate(config): the loop that ties data, step, snapshots, monitors and reports together.

The loop dispatches step N, then reads step N-1's scalars (one step late, so the device never
waits for Python); monitor statistics are read only when their interval is due.
"""
import dataclasses
import json
import math
import os
import shutil
import signal
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from gptjax import checkpoint, config as config_lib, data, early_stop, monitor, optim, reporting
from gptjax.config import ARCH_FIELDS, ConfigError
from gptjax.model import GPT, ModelConfig, count_params, padded_vocab_size
from gptjax.step import init_state, make_eval_step, make_train_step

RUN_FIELDS = ("dataset", "max_samples", "batch_size", "seed")


class NonFiniteError(RuntimeError):
  """Training stopped because a loss or gradient was not finite."""


def model_config(config, n_vocab: int) -> ModelConfig:
  platform = jax.default_backend()
  dtype = config.compute_dtype
  if dtype == "auto":
    dtype = "float32" if platform == "cpu" else "bfloat16"
  attention = {"auto": None if platform == "gpu" else "xla"}.get(config.attention,
                                                                   config.attention)
  return ModelConfig(vocab_size=padded_vocab_size(n_vocab), d_model=config.d_model,
                     num_heads=config.num_heads, num_layers=config.num_layers, d_ff=config.d_ff,
                     max_seq_len=config.max_seq_len, dropout=config.dropout,
                     dtype=jnp.dtype(dtype), attention=attention, remat=config.remat)


def model_info(mcfg: ModelConfig, config, n_vocab: int) -> dict:
  """What `models/model_*/model.json` records: enough to rebuild and use the model alone."""
  arch = dataclasses.asdict(mcfg)
  arch["dtype"] = jnp.dtype(mcfg.dtype).name
  return {"model": arch, "tokenizer": config.tokenizer, "n_vocab": n_vocab,
          "dataset": config.dataset}


def device_description() -> str:
  devices = jax.devices()
  kind = {"gpu": "cuda"}.get(jax.default_backend(), jax.default_backend())
  return f"{kind} ({devices[0].device_kind} x{len(devices)})"


def find_resume_snapshot(config, run_dir: str, explicit: frozenset):
  """(snapshots_dir, step, meta) to resume from, or None; applies the snapshot's run identity."""
  if config.checkpoint_file:
    snap_dir, step = checkpoint.snapshot_step(config.checkpoint_file)
  elif config.resume:
    snap_dir = os.path.join(run_dir, "snapshots")
    steps = checkpoint.Snapshots(snap_dir, 1, read_only=True).steps() \
        if os.path.isdir(snap_dir) else []
    if not steps:
      raise ConfigError(f"resume: no snapshot to resume in {snap_dir}; start a new run without "
                        "--resume, or pass --checkpoint_file PATH")
    step = max(steps)
  else:
    return None
  meta = checkpoint.read_meta(os.path.join(snap_dir, f"{checkpoint.SNAPSHOT_PREFIX}_{step}"))
  saved = meta["config"]
  for field in ARCH_FIELDS + RUN_FIELDS:
    if field in explicit and config[field] != saved[field]:
      raise ConfigError(f"{field}: the snapshot was trained with {field}={saved[field]!r} but "
                        f"{field}={config[field]!r} was given; drop the option to resume")
    config[field] = saved[field]
  return snap_dir, step, meta


def confirm_resume(path: str, meta: dict, assume_yes: bool) -> None:
  val = meta.get("val_loss")
  print(f"Found snapshot {path}\n  step {meta['step']}, epoch {meta['epoch'] + 1} "
        f"(batch {meta['index']}), saved {meta['time']}, "
        f"val loss {'n/a' if val is None else f'{val:.4f}'}")
  if assume_yes:
    return
  if not sys.stdin.isatty():
    raise ConfigError("yes: standard input is not a terminal, so loading the snapshot cannot be "
                      "confirmed; add --yes (-y) to resume without asking")
  if input("Resume from this snapshot? [y/N] ").strip().lower() not in ("y", "yes"):
    raise ConfigError("resume: not confirmed; nothing was loaded")


class _StopSignal:
  """SIGTERM/SIGINT set a flag; the loop saves a snapshot and exits at the next step boundary."""

  def __init__(self):
    self.signum = 0

  def __enter__(self):
    self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}
    return self

  def _handle(self, signum, frame):
    self.signum = signum

  def __exit__(self, *exc):
    for s, handler in self.previous.items():
      signal.signal(s, handler)


def evaluate(eval_step, params, tokens, seq_len: int, batch_size: int) -> float:
  """Token-weighted mean loss over the whole split."""
  loss_sum, count = 0.0, 0.0
  for batch in data.prefetch(data.eval_batches(tokens, seq_len, batch_size), jax.device_put):
    s, n = eval_step(params, *batch)
    loss_sum, count = loss_sum + s, count + n
  return float(loss_sum) / max(float(count), 1.0)


def train_and_evaluate(config, *, explicit: frozenset = frozenset(), log_file: str = "") -> dict:
  """Trains `config` to the end (or to an early stop or a signal); returns a summary dict."""
  run_dir = config_lib.output_dir(config)
  resume = find_resume_snapshot(config, run_dir, explicit)
  config_lib.validate(config)
  if resume:
    meta = resume[2]
    if meta["epoch"] >= config.epochs or meta["early_stop"].get("stopped"):
      print(f"This run is finished: {meta['epoch']} of {config.epochs} epochs done"
            + (f" (early stop: {meta['early_stop']['reason']})"
               if meta["early_stop"].get("stopped") else "")
            + "; raise --epochs to train further.")
      return {"finished": True, "step": meta["step"]}
    confirm_resume(os.path.join(resume[0], f"snapshot_{resume[1]}"), meta, config.yes)

  splits = {s: data.load_tokens(config.dataset, s, config.tokenizer, config.max_samples,
                                config.data_cache_dir) for s in data.SPLITS}
  for split, tokens in splits.items():
    if len(tokens) < config.max_seq_len + 1:
      raise ConfigError(f"max_seq_len: {config.max_seq_len} is longer than the tokenized {split} "
                        f"split ({len(tokens):,} tokens); lower max_seq_len")
  windows = data.TrainWindows(splits["train"], config.max_seq_len, config.batch_size, config.seed)
  total_steps = windows.steps_per_epoch * config.epochs

  report = reporting.Reporter(run_dir, log_file)
  try:
    with _StopSignal() as stop:
      return _train(config, run_dir, report, splits, windows, total_steps, resume, stop)
  finally:
    report.close()


def _train(config, run_dir, report, splits, windows, total_steps, resume, stop) -> dict:
  enc = data.get_tokenizer(config.tokenizer)
  mcfg = model_config(config, enc.n_vocab)
  model = GPT(mcfg)
  tx = optim.make_optimizer(config, total_steps)
  schedule = optim.lr_schedule(config.lr, config.warmup_steps, total_steps, config.min_lr_ratio)
  rng = jax.random.key(config.seed)
  state = init_state(model, tx, jax.random.fold_in(rng, 0), config.max_seq_len)
  sample_idx = monitor.make_sample_indices(state.params, config.weight_monitor_sample_size,
                                           config.seed)
  train_step = make_train_step(model, tx, schedule, config, sample_idx)
  eval_step = make_eval_step(model)
  eval_batch = config.eval_batch_size or config.batch_size
  restore_best = bool(config.early_stopping and config.early_stop_restore_best)

  snapshots = checkpoint.Snapshots(os.path.join(run_dir, "snapshots"),
                                   config.keep_last_n_snapshots)
  resolved = config.to_dict()
  for path in (run_dir, snapshots.directory):
    with open(os.path.join(path, "run_config.json"), "w") as f:
      json.dump(resolved, f, indent=2)

  epoch, index, history, stopper = 0, 0, [], early_stop.EarlyStopState()
  best_params = state.params if restore_best else None
  if resume:
    saved = {"train": state, "best": best_params} if restore_best else {"train": state}
    restored, meta = checkpoint.restore(
        checkpoint.Snapshots(resume[0], config.keep_last_n_snapshots), resume[1], saved)
    state, best_params = restored["train"], restored.get("best")
    epoch, index, history = meta["epoch"], meta["index"], meta["history"]
    stopper = early_stop.EarlyStopState.from_json(meta["early_stop"])
    report.info(f"Resumed from step {int(state.step)} (epoch {epoch + 1}, batch {index})")

  n_params = count_params(mcfg)
  tokens_per_step = config.batch_size * config.max_seq_len
  report.info(f"Device: {device_description()}; compute {jnp.dtype(mcfg.dtype).name}, "
              f"attention {mcfg.attention or 'auto'}")
  report.info(f"Model: {n_params:,} parameters ({n_params / 1e6:.1f}M); d_model {mcfg.d_model}, "
              f"{mcfg.num_heads} heads, {mcfg.num_layers} layers, d_ff {mcfg.d_ff}, "
              f"context {mcfg.max_seq_len}, vocab {enc.n_vocab} (padded {mcfg.vocab_size})")
  report.info(f"Data: {config.dataset} ({config.tokenizer}); train {len(splits['train']):,} "
              f"tokens, {windows.steps_per_epoch * tokens_per_step:,} tokens per epoch in "
              f"{windows.steps_per_epoch} steps; valid {len(splits['valid']):,}; "
              f"test {len(splits['test']):,}")
  report.info(f"Training {config.epochs} epochs = {total_steps} steps of {tokens_per_step:,} "
              f"tokens; run directory {os.path.abspath(run_dir)}")
  if config.warmup_steps > total_steps:
    report.info(f"Warning: warmup_steps {config.warmup_steps} is longer than the whole run "
                f"({total_steps} steps); the peak lr is reached at the last step")

  def snapshot(val_loss=None):
    meta = {"step": int(state.step), "epoch": epoch, "index": index, "history": history,
            "time": reporting.timestamp(), "val_loss": val_loss, "early_stop": stopper.to_json(),
            "initial_val_loss": initial_val_loss,
            "config": resolved, "model": model_info(mcfg, config, enc.n_vocab)}
    snapshots.save(int(state.step), {"train": state, "best": best_params} if restore_best
                   else {"train": state}, meta)

  clock = {"t": time.time(), "step": int(state.step), "start": time.time()}
  epoch_loss = [0.0, 0]

  def read(step, metrics):
    """Host side of step `step`: finite check every step; logs and monitors when due."""
    loss, finite = jax.device_get((metrics["loss"], metrics["finite"]))
    if finite:
      epoch_loss[0] += float(loss)
      epoch_loss[1] += 1
    interval = config.sanity_check_interval
    if not finite or (interval and step % interval == 0):
      where = monitor.nonfinite_where(jax.device_get(metrics["sanity"]))
      if where or not finite:
        last = snapshots.latest_step()
        raise NonFiniteError(
            f"non-finite values at step {step}: {where or 'loss/gradient norm'}; the update was "
            f"not applied. Last good snapshot: "
            f"{snapshots.path(last) if last is not None else 'none'}. "
            "Lower --lr, raise --warmup_steps or check --gradient_clip.")
    scalars = {}
    if "grad" in metrics and step % config.gradient_monitor_interval == 0:
      line, s, flags = monitor.gradient_report(
          jax.device_get(metrics["grad"]), config.grad_vanish_threshold,
          config.grad_explode_threshold)
      report.info(f"[grad step {step}] {line}")
      for flag in flags:
        report.info(f"[grad step {step}] WARNING {flag}")
      scalars.update(s)
    if "weight" in metrics and step % config.weight_monitor_interval == 0:
      line, s = monitor.weight_report(jax.device_get(metrics["weight"]))
      report.info(f"[weights step {step}] {line}")
      scalars.update(s)
    if step % config.log_interval == 0 or step == total_steps - 1:
      now = time.time()
      tok_s = (step + 1 - clock["step"]) * tokens_per_step / max(now - clock["t"], 1e-9)
      clock.update(t=now, step=step + 1)
      lr, grad_norm = jax.device_get((metrics["lr"], metrics["grad_norm"]))
      eta = (total_steps - step - 1) * tokens_per_step / max(tok_s, 1e-9)
      report.info(f"step {step + 1}/{total_steps} | epoch {epoch + 1} | loss {loss:.4f} | "
                  f"ppl {math.exp(min(loss, 50)):.1f} | lr {lr:.2e} | grad {grad_norm:.3f} | "
                  f"{tok_s:,.0f} tok/s | ETA {reporting.format_duration(eta)}")
      scalars.update({"train/loss": float(loss), "train/perplexity": math.exp(min(loss, 50)),
                      "train/lr": float(lr), "train/tokens_per_s": tok_s,
                      "train/grad_norm": float(grad_norm)})
    report.scalars(step, scalars)

  if not resume:  # the baseline every later validation is compared with, as nanoGPT's iter 0
    initial_val_loss = evaluate(eval_step, state.params, splits["valid"], config.max_seq_len,
                                eval_batch)
    report.info(f"Before training | val loss {initial_val_loss:.4f} | "
                f"val ppl {math.exp(initial_val_loss):.2f}")
    report.scalars(0, {"val/loss": initial_val_loss, "val/perplexity": math.exp(initial_val_loss)})
  else:
    initial_val_loss = meta.get("initial_val_loss")

  status = "completed"
  while epoch < config.epochs and status == "completed":
    report.start_epoch(epoch + 1, windows.steps_per_epoch, index)
    batches = data.prefetch(windows.epoch(epoch, index), jax.device_put)
    pending = None
    for batch in batches:
      step = int(state.step) if pending is None else pending[0] + 1
      state, metrics = train_step(state, batch, rng)
      if pending:
        read(*pending)
      pending = (step, metrics)
      index += 1
      report.progress()
      at_interval = config.snapshot_interval and (step + 1) % config.snapshot_interval == 0
      if stop.signum or (at_interval and index < windows.steps_per_epoch):
        read(*pending)
        pending = None
        snapshot()
        if stop.signum:
          status = "interrupted"
          break
    if pending:
      read(*pending)
    report.end_epoch()
    if status != "completed":
      break
    val_loss = evaluate(eval_step, state.params, splits["valid"], config.max_seq_len, eval_batch)
    train_loss = epoch_loss[0] / max(epoch_loss[1], 1)
    epoch_loss[:] = [0.0, 0]
    stopper, improved = early_stop.update(stopper, config, epoch + 1, val_loss, train_loss)
    if improved and restore_best:
      best_params = jax.tree.map(jnp.copy, state.params)
    history.append({"epoch": epoch + 1, "step": int(state.step), "train_loss": train_loss,
                    "val_loss": val_loss})
    report.info(f"Epoch {epoch + 1}/{config.epochs} | train loss {train_loss:.4f} | "
                f"val loss {val_loss:.4f} | val ppl {math.exp(val_loss):.2f}"
                + (" (best)" if improved else ""))
    report.scalars(int(state.step), {"val/loss": val_loss, "val/perplexity": math.exp(val_loss)})
    epoch, index = epoch + 1, 0
    snapshot(val_loss)
    if stopper.stopped:
      report.info(f"Early stopping after epoch {epoch}: {stopper.reason}")
      break

  snapshots.wait()
  if status == "interrupted":
    snapshots.close()
    report.info(f"Stopped by signal {stop.signum} at step {int(state.step)}; snapshot saved to "
                f"{snapshots.path(int(state.step))}. Resume with: python -m gptjax.train "
                f"--output_dir {run_dir} --resume --yes")
    return {"status": status, "step": int(state.step), "history": history,
            "signal": stop.signum}

  final_params = state.params
  if restore_best and stopper.best_epoch >= 1 and stopper.best_epoch != epoch:
    final_params = best_params
    report.info(f"Restored the best weights: epoch {stopper.best_epoch} "
                f"(val loss {stopper.best_val_loss:.4f})")
  test_loss = evaluate(eval_step, final_params, splits["test"], config.max_seq_len, eval_batch)
  report.info(f"Test loss {test_loss:.4f} | test ppl {math.exp(test_loss):.2f}")
  report.scalars(int(state.step), {"test/loss": test_loss, "test/perplexity": math.exp(test_loss)})
  info = model_info(mcfg, config, enc.n_vocab)
  info.update(step=int(state.step), epochs=epoch, history=history, test_loss=test_loss,
              config=resolved)
  model_path = checkpoint.save_model(os.path.join(run_dir, "models"), f"model_{report.stamp}",
                                     final_params, info)
  report.info(f"Final model saved to {model_path}")
  snapshots.close()
  if config.delete_snapshots_after_training:
    shutil.rmtree(snapshots.directory, ignore_errors=True)
    report.info("Snapshots deleted (keep them with --no_delete_snapshots_after_training)")
  return {"status": status, "step": int(state.step), "history": history,
          "initial_val_loss": initial_val_loss, "test_loss": test_loss, "model_path": model_path, "params": final_params}
