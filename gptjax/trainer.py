"""train_and_evaluate(config): the loop that ties data, step, snapshots, monitors and reports together.

The loop dispatches step N, then reads step N-1's scalars (one step late, so the device never
waits for Python); monitor statistics are read only when their interval is due.
"""
import dataclasses
import glob
import json
import math
import os
import shlex
import shutil
import signal
import sys
import time
import uuid
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from gptjax import checkpoint, config as config_lib, data, early_stop, monitor, optim, reporting
from gptjax import evaluate, generate, hf, plan as plan_lib, rundir, sharding, sources
from gptjax.config import ConfigError
from gptjax.model import GPT, ModelConfig, count_params
from gptjax.step import TrainState, init_state, make_eval_step, make_train_step

# Where and how this invocation runs, not what it trains: never taken from a snapshot.
INVOCATION_FIELDS = ("resume", "checkpoint_file", "yes", "allow_data_change", "output_dir",
                     "coordinator_address", "num_processes", "process_id", "mesh_data",
                     "mesh_fsdp", "shard_optimizer", "tokenizer_threads")
# What chooses the text a run trains on: other values on resume need --allow_data_change.
DATA_FIELDS = ("dataset",) + config_lib.SOURCE_FIELDS
# What a resumed run may be given anew (logged): its length, how it reports, snapshots and runs.
# Every other field is the run's identity: given with another value than the snapshot's, an error.
CHANGEABLE_ON_RESUME = (
    "epochs", "eval_batch_size", "log_interval", "sample_prompts", "sample_max_new_tokens",
    "snapshot_interval", "keep_last_n_snapshots", "delete_snapshots_after_training",
    "gradient_monitor", "gradient_monitor_interval", "grad_vanish_threshold",
    "grad_explode_threshold", "weight_monitor", "weight_monitor_interval",
    "weight_monitor_sample_size", "sanity_check_interval", "early_stop_patience",
    "early_stop_min_delta", "early_stop_overfit_min_delta", "data_cache_dir",
    "remat") + plan_lib.PLAN_FIELDS
# What a snapshot's meta holds; a directory without these is not a gptjax snapshot.
META_KEYS = ("step", "epoch", "index", "history", "epoch_loss", "early_stop", "config", "model")


class NonFiniteError(RuntimeError):
  """Training stopped because a loss or gradient was not finite."""


def model_info(mcfg: ModelConfig, config, n_vocab: int, plan) -> dict:
  """What `models/model_*/model.json` records: enough to rebuild and use the model alone, and the
  plan it was trained with."""
  # "model" is what the model computes, in its dtype and attention; how is the plan's record.
  how = set(plan_lib.model_fields(plan)) - {"dtype", "attention"}
  arch = {k: v for k, v in dataclasses.asdict(mcfg).items() if k not in how}
  arch["dtype"] = jnp.dtype(mcfg.dtype).name
  return {"model": arch, "plan": plan.to_json(), "tokenizer": config.tokenizer, "n_vocab": n_vocab,
          # A folder is recorded absolute: evaluate may run from another directory.
          "dataset": config.dataset if config.dataset in config_lib.HUB_DATASETS
                     else os.path.abspath(config.dataset)}


def device_description() -> str:
  devices = jax.devices()
  kind = {"gpu": "cuda"}.get(jax.default_backend(), jax.default_backend())
  return f"{kind} ({devices[0].device_kind} x{len(devices)})"


class Resume(NamedTuple):
  snap_dir: str
  step: int
  meta: dict
  changes: list  # (field, the snapshot's value, this run's), each allowed and logged


def find_resume_snapshot(config, run_dir: str, explicit: frozenset,
                         can_ask: bool = False) -> Resume | None:
  """The snapshot to resume from, checked against its manifest, or None; applies the snapshot's
  run identity to `config`. `can_ask`: the caller can ask the user whether to resume."""
  if config.checkpoint_file:
    snap_dir, step = checkpoint.snapshot_step(config.checkpoint_file)
  else:
    snap_dir = os.path.join(run_dir, "snapshots")
    steps = checkpoint.complete_steps(snap_dir)
    if not steps and config.resume:
      raise ConfigError(f"resume: no snapshot to resume in {snap_dir}; start a new run without "
                        "--resume, or pass --checkpoint_file PATH")
    if not steps:
      return None
    # As the guide's trainer: a run that finds snapshots offers to continue them. Starting a new
    # run over them is refused: rotation would delete the new run's snapshots first.
    if not (config.resume or config.yes or can_ask):
      raise ConfigError(f"resume: {snap_dir} holds snapshots of an earlier run (newest step "
                        f"{max(steps)}); add --resume --yes to continue it, or give another "
                        "--output_dir for a new run")
    step = max(steps)
  path = checkpoint.snapshot_path(snap_dir, step)
  checkpoint.check_snapshot(path)
  meta = checkpoint.read_meta(path)
  missing = [k for k in META_KEYS if k not in meta]
  if missing:
    raise ConfigError(f"checkpoint_file: {path} is not a gptjax snapshot (its meta item lacks "
                      f"{', '.join(missing)})")
  # The resumed run is the same run: every field not given again comes from the snapshot; of
  # those given, only run length and the like may change (logged), and other data if allowed.
  changeable = CHANGEABLE_ON_RESUME + (DATA_FIELDS if config.allow_data_change else ())
  changes = []
  for field, value in meta["config"].items():
    if field not in config or field in INVOCATION_FIELDS:
      continue
    if field not in explicit:
      config[field] = value
    elif config[field] != value and field in changeable:
      changes.append((field, value, config[field]))
    elif config[field] != value:
      hint = (" (or --allow_data_change to train on other data)" if field in DATA_FIELDS else "")
      raise ConfigError(f"{field}: the snapshot was trained with {field}={value!r} but "
                        f"{field}={config[field]!r} was given; drop the option to resume"
                        f"{hint}, or start a new run in another --output_dir")
  return Resume(snap_dir, step, meta, changes)


def check(config, explicit: frozenset = frozenset(), can_ask: bool = False) -> Resume | None:
  """Everything decidable before tokenizing, writing nothing (all of `--check_only`):
  the run directory (made absolute in `config`, free of a running writer), the snapshot to
  resume (its run identity applied to `config`), then every value. Resuming needs config.yes
  unless the caller `can_ask` the user (the CLI, at a terminal)."""
  if config.dataset not in config_lib.HUB_DATASETS and os.path.isdir(config.dataset):
    config.dataset = os.path.abspath(config.dataset)  # the run's data, wherever it resumes from
  run_dir = config.output_dir = os.path.abspath(config_lib.output_dir(config))
  if os.path.exists(run_dir) and not os.path.isdir(run_dir):
    raise ConfigError(f"output_dir: {run_dir} is a file; give a directory (it is created if "
                      "missing)")
  if jax.process_index() == 0:
    rundir.check_free(run_dir)
  resume = find_resume_snapshot(config, run_dir, explicit, can_ask)
  config_lib.validate(config)
  plan_lib.resolve(config, jax.default_backend(), jax.device_count())   # what cannot run here
  if config.init_from and not resume:
    hf.check_init_from(config)
  data.check_sources(config.dataset, config.tokenizer, config.data_cache_dir, config.max_samples,
                     **data.source_options(config))
  if resume and not config.yes and not can_ask:
    raise ConfigError("yes: standard input is not a terminal, so loading the snapshot cannot be "
                      "confirmed; add --yes (-y) to resume without asking")
  return resume


def describe_snapshot(path: str, meta: dict) -> str:
  val = meta.get("val_loss")
  return (f"Found snapshot {path}\n  step {meta['step']}, epoch {meta['epoch'] + 1} "
          f"(batch {meta['index']}), saved {meta['time']}, "
          f"val loss {'n/a' if val is None else f'{val:.4f}'}")


class _StopSignal:
  """SIGTERM, SIGINT and SIGHUP (a closed terminal) set a flag: training and evaluation stop at
  the next step or batch, with a snapshot. A second signal stops at once (KeyboardInterrupt);
  what is on disk stays whole, since every save is atomic."""

  def __init__(self):
    self.signum = 0

  def __enter__(self):
    self.previous = {s: signal.signal(s, self._handle)
                     for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    return self

  def _handle(self, signum, frame):
    if self.signum:
      raise KeyboardInterrupt(f"signal {signum} received twice")
    self.signum = signum
    print(f"Signal {signum} received: stopping at the next step with a snapshot (send it again "
          "to stop at once)", file=sys.stderr, flush=True)

  def __exit__(self, *exc):
    for s, handler in self.previous.items():
      signal.signal(s, handler)


@dataclasses.dataclass
class Progress:
  """Where a run stands, besides its weights: what every snapshot's meta records (with the run's
  identity) and a resume restores. The run is at batch `index` of epoch `epoch` (0-based; epoch
  == epochs once training is done)."""
  epoch: int = 0
  index: int = 0
  history: list = dataclasses.field(default_factory=list)   # per epoch: step, train/val loss
  early_stop: "early_stop.EarlyStopState" = dataclasses.field(   # the field hides the module
      default_factory=early_stop.EarlyStopState)
  epoch_loss: list = dataclasses.field(default_factory=lambda: [0.0, 0])  # this epoch's (sum, n)
  initial_val_loss: float | None = None

  def to_meta(self) -> dict:
    return {"epoch": self.epoch, "index": self.index, "history": self.history,
            "early_stop": self.early_stop.to_json(), "epoch_loss": list(self.epoch_loss),
            "initial_val_loss": self.initial_val_loss}

  @classmethod
  def from_meta(cls, meta: dict) -> "Progress":
    return cls(epoch=meta["epoch"], index=meta["index"], history=meta["history"],
               early_stop=early_stop.EarlyStopState.from_json(meta["early_stop"]),
               epoch_loss=list(meta["epoch_loss"]),
               initial_val_loss=meta.get("initial_val_loss"))


class StepReader:
  """The host side of each step, read one step late: the finite check every step, the epoch's
  loss sum (in `progress`), and the monitor reports, log line and TensorBoard points when they
  are due."""

  def __init__(self, config, report, total_steps: int, on_nonfinite, progress: Progress,
               eval_tokens=(0, 0)):
    self.config, self.report, self.total_steps = config, report, total_steps
    self.on_nonfinite, self.progress = on_nonfinite, progress
    # The ETA counts the evaluations still to come: each validation and the test split, at the
    # pace (seconds per token) of the last one measured.
    self.n_valid, self.n_test = eval_tokens
    self.eval_pace = 0.0
    self.tokens_per_step = config_lib.sequences_per_step(config) * config.max_seq_len
    # {step, steps, seconds} per log interval: what gptjax.bench --loop reads. The first
    # interval of a process holds the compilation.
    self.throughput = []
    self.restart_clock(0)

  def restart_clock(self, step: int) -> None:
    """tok/s counts training steps only, not an evaluation or snapshot before them."""
    self.clock_t, self.clock_step = time.time(), step

  def take_epoch_loss(self) -> float:
    total, n = self.progress.epoch_loss
    self.progress.epoch_loss = [0.0, 0]
    return total / max(n, 1)

  def __call__(self, step: int, metrics: dict) -> None:
    config, report = self.config, self.report
    loss, finite = jax.device_get((metrics["loss"], metrics["finite"]))
    if finite:
      self.progress.epoch_loss[0] += float(loss)
      self.progress.epoch_loss[1] += 1
    interval = config.sanity_check_interval
    if not finite or (interval and step % interval == 0):
      where = monitor.nonfinite_where(jax.device_get(metrics["sanity"]).unpack())
      if where or not finite:
        self.on_nonfinite(step, where or "the global gradient norm (it overflowed; each gradient "
                          "value is finite)", applied=bool(finite))
    scalars = {}
    if "grad" in metrics and step % config.gradient_monitor_interval == 0:
      line, s, flags = monitor.gradient_report(
          jax.device_get(metrics["grad"]).unpack(), config.grad_vanish_threshold,
          config.grad_explode_threshold)
      report.info(f"[grad step {step + 1}] {line}")
      for flag in flags:
        report.info(f"[grad step {step + 1}] WARNING {flag}")
      scalars.update(s)
    if "weight" in metrics and step % config.weight_monitor_interval == 0:
      line, s = monitor.weight_report(jax.device_get(metrics["weight"]).unpack())
      report.info(f"[weights step {step + 1}] {line}")
      scalars.update(s)
    if step % config.log_interval == 0 or step == self.total_steps - 1:
      scalars.update(self._log_line(step, self.progress.epoch, float(loss), metrics))
    report.scalars(step, scalars)

  def _log_line(self, step: int, epoch: int, loss: float, metrics: dict) -> dict:
    now = time.time()
    steps_done, seconds = step + 1 - self.clock_step, max(now - self.clock_t, 1e-9)
    tok_s = steps_done * self.tokens_per_step / seconds
    self.throughput.append({"step": step, "steps": steps_done, "seconds": seconds})
    self.restart_clock(step + 1)
    lr, grad_norm = jax.device_get((metrics["lr"], metrics["grad_norm"]))
    eta = (self.total_steps - step - 1) * self.tokens_per_step / max(tok_s, 1e-9)
    eta += self.eval_pace * ((self.config.epochs - epoch) * self.n_valid + self.n_test)
    speed = (f"{tok_s:,.0f} tok/s | ETA {reporting.format_duration(eta)}"
             if len(self.throughput) > 1
             else f"{seconds:.1f} s incl. compilation")
    ppl = math.exp(min(loss, 50))
    self.report.info(f"step {step + 1}/{self.total_steps} | epoch {epoch + 1} | loss {loss:.4f} | "
                     f"ppl {ppl:.1f} | lr {lr:.2e} | grad {grad_norm:.3f} | {speed}")
    # The bar (a terminal only) shows the numbers just read: no extra device read.
    self.report.progress(0, loss=f"{loss:.3f}", lr=f"{lr:.1e}", **{"tok/s": f"{tok_s:,.0f}"})
    return {"train/loss": loss, "train/perplexity": ppl, "train/lr": float(lr),
            "train/tokens_per_s": tok_s, "train/grad_norm": float(grad_norm)}


def final_model_of(run_dir: str, meta: dict) -> str | None:
  """The final model this run wrote from the state of snapshot `meta`, if there is one."""
  for path in sorted(glob.glob(os.path.join(glob.escape(run_dir), "models", "model_*",
                                            "model.json"))):
    try:
      with open(path) as f:
        info = json.load(f)
    except (OSError, ValueError):
      continue
    if info.get("step") == meta["step"] and info.get("run_id") == meta.get("run_id"):
      return os.path.dirname(path)
  return None


def check_same_data(config, resume: Resume, fingerprints: dict) -> None:
  """Other tokens than the snapshot's (another dataset, or its files edited) are an error unless
  --allow_data_change; then they are one of the changes the log states."""
  saved = resume.meta.get("data", {}).get("fingerprints", {})
  changed = [s for s in data.SPLITS if s in saved and saved[s] != fingerprints[s]]
  if changed and not config.allow_data_change:
    raise ConfigError(
        f"dataset: the {', '.join(changed)} split(s) of {config.dataset} differ from the data the "
        f"snapshot was trained on (train tokens {saved.get('train', '?')[:19]} then, "
        f"{fingerprints['train'][:19]} now): its files changed or another dataset is given; "
        "pass --allow_data_change to resume on this data anyway")
  resume.changes.extend((f"{s} split", saved[s][:19], fingerprints[s][:19]) for s in changed)


def train_and_evaluate(config, *, explicit: frozenset = frozenset(), log_file: str = "",
                       confirm: Callable[[str], bool] | None = None) -> dict:
  """Trains `config` to the end (or to an early stop or a signal); returns a summary dict.
  A resumed run whose training is complete but which has no final model yet (a failure or a
  signal after the last epoch) gets its test evaluation and final model. Found snapshots are
  resumed with config.yes, or if `confirm(question)` (the CLI's prompt) says so."""
  resume = check(config, explicit, can_ask=confirm is not None)
  run_dir = config.output_dir  # absolute, after check
  if resume:
    meta = resume.meta
    stopped, done = meta["early_stop"].get("stopped"), meta["epoch"] >= config.epochs
    model = final_model_of(run_dir, meta) if stopped or done else None
    if model:
      print(f"This run is finished after epoch {meta['epoch']} (early stop: "
            f"{meta['early_stop']['reason']}); its final model is {model}." if stopped else
            f"This run is finished: {meta['epoch']} of {config.epochs} epochs done; its final "
            f"model is {model}. Raise --epochs to train further.")
      return {"finished": True, "step": meta["step"], "model_path": model}
    if stopped or done:
      print("Training of this run is complete, but its final model was never written: "
            "finishing it (test evaluation, final model).")
    print(describe_snapshot(checkpoint.snapshot_path(resume.snap_dir, resume.step), meta))
    if not config.yes and not confirm("Resume from this snapshot?"):
      raise ConfigError("resume: not confirmed; nothing was loaded")

  splits = {s: data.load_tokens(config.dataset, s, config.tokenizer, config.max_samples,
                                config.data_cache_dir, threads=config.tokenizer_threads,
                                **data.source_options(config)) for s in data.SPLITS}
  for split, tokens in splits.items():
    if len(tokens) < config.max_seq_len + 1:
      raise ConfigError(f"max_seq_len: {config.max_seq_len} is longer than the tokenized "
                        f"{split} split ({len(tokens):,} tokens); lower max_seq_len")
  fingerprints = {s: data.fingerprint(t) for s, t in splits.items()}
  if resume:
    check_same_data(config, resume, fingerprints)
  windows = data.TrainWindows(splits["train"], config.max_seq_len,
                              config_lib.sequences_per_step(config), config.seed)
  total_steps = windows.steps_per_epoch * config.epochs

  # One writer per run directory from here on; the OS releases the lock however this ends.
  lock = rundir.RunLock(run_dir) if jax.process_index() == 0 else None
  try:
    snap_dir = os.path.join(run_dir, "snapshots")
    # Rotation keeps the highest steps: later snapshots than the one resumed (another future of
    # this run, or saves that never completed) would delete the resumed run's own first.
    aside = checkpoint.move_aside(snap_dir, resume.step) if resume and lock else None
    report = reporting.Reporter(run_dir, log_file,
                                stamp=sharding.from_process_0(reporting.timestamp()))
    if aside:
      report.info(f"Snapshots later than step {resume.step} moved aside to {aside}")
    snapshots = checkpoint.Snapshots(snap_dir, config.keep_last_n_snapshots)
    try:
      with _StopSignal() as stop:
        return _train(config, run_dir, report, RunData(splits, windows, total_steps, fingerprints),
                      resume, stop, snapshots)
    finally:
      snapshots.close()  # whatever ended the run, the saves in flight complete first
      report.close()
  finally:
    if lock:
      lock.release()


def _log_run_header(report, config, plan, mcfg, enc, mesh, splits, windows, total_steps,
                    run_dir):
  """The lines that open a run's log: device, plan, mesh, model, data, length."""
  n_params = count_params(mcfg)
  tokens_per_step = config_lib.sequences_per_step(config) * config.max_seq_len
  report.info(f"Device: {device_description()}")
  report.info(plan.describe())
  report.info(f"Mesh: data {mesh.shape['data']} x fsdp {mesh.shape['fsdp']} over "
              f"{jax.process_count()} process(es); {config.batch_size // mesh.devices.size} "
              f"sequences per device" + (
                  f" in each of {config.grad_accum_steps} micro-batches of {config.batch_size}; "
                  f"effective batch {config_lib.sequences_per_step(config)} sequences"
                  if config.grad_accum_steps > 1 else ""))
  report.info(f"Model: {n_params:,} parameters ({n_params / 1e6:.1f}M); d_model {mcfg.d_model}, "
              f"{mcfg.num_heads} heads, {mcfg.num_layers} layers, d_ff {mcfg.d_ff}, "
              f"context {mcfg.max_seq_len}, vocab {enc.n_vocab} (padded {mcfg.vocab_size})")
  report.info(f"Data: {config.dataset} ({config.tokenizer}); train {len(splits['train']):,} "
              f"tokens, {windows.steps_per_epoch * tokens_per_step:,} tokens per epoch in "
              f"{windows.steps_per_epoch} steps; valid {len(splits['valid']):,}; "
              f"test {len(splits['test']):,}")
  if config.held_out_fraction:
    report.info("Held out: valid and test each "
                + sources.held_out_statement("valid", config.held_out_fraction))
  report.info(f"Training {config.epochs} epochs = {total_steps} steps of {tokens_per_step:,} "
              f"tokens; run directory {os.path.abspath(run_dir)}")
  if config.warmup_steps > total_steps:
    report.info(f"Warning: warmup_steps {config.warmup_steps} is longer than the whole run "
                f"({total_steps} steps); the peak lr is reached at the last step")


class Training(NamedTuple):
  plan: plan_lib.Plan
  mcfg: ModelConfig
  model: GPT
  mesh: jax.sharding.Mesh
  rng: jax.Array
  state: TrainState
  train_step: Callable


def build_training(config, n_vocab: int, total_steps: int) -> Training:
  """The model, the device mesh, the run's key, the sharded initial state and the jitted train
  step of `config`, computed as its plan (resolved here, once) says: what the loop runs (and
  gptjax.bench times)."""
  mesh = sharding.make_mesh(config)
  sharding.check_batch_size(config.batch_size, mesh)
  plan = plan_lib.resolve(config, jax.default_backend(), mesh.devices.size)
  mcfg = plan_lib.model_config(config, n_vocab, plan)
  model = GPT(mcfg)
  schedule = optim.make_schedule(config, total_steps)
  tx = optim.make_optimizer(config, schedule)
  rng = jax.random.key(config.seed)
  # Created in its shards: with fsdp the whole state never sits on one device.
  state, state_sharding = sharding.init_sharded(
      lambda key: init_state(model, tx, key, config.max_seq_len),
      lambda abstract: sharding.state_shardings(abstract, mesh, config.shard_optimizer),
      jax.random.fold_in(rng, 0))
  sample_idx = monitor.make_sample_indices(state.params, config.weight_monitor_sample_size,
                                           config.seed)
  train_step = make_train_step(model, tx, schedule, config, sample_idx, state_sharding, mesh,
                               plan.compiler_options())
  return Training(plan, mcfg, model, mesh, rng, state, train_step)


class RunData(NamedTuple):
  splits: dict          # split -> token ids
  windows: data.TrainWindows
  total_steps: int
  fingerprints: dict    # split -> data.fingerprint


def _train(config, run_dir: str, report, run_data: RunData, resume: Resume | None, stop,
           snapshots) -> dict:
  """The loop: the baseline validation of a new run, then per epoch its (remaining) steps and
  the validation that ends it, then the test evaluation and the final model. A signal stops it
  at the next step or batch, with a snapshot to resume from."""
  run = _Run(config, run_dir, report, run_data, resume, stop, snapshots)
  if not resume and not run.baseline():
    report.info(f"Stopped by signal {stop.signum} before training; nothing to resume")
    return {"status": "interrupted", "step": 0, "history": [], "signal": stop.signum}
  while run.progress.epoch < config.epochs and not run.progress.early_stop.stopped:
    if not (run.train_epoch() and run.end_epoch()):
      return run.interrupted()
  return run.finish()


class _Run:
  """A run between its start and its end: the state on the devices, its Progress, the best
  weights kept for early stopping, and what touches the outside (snapshots, report, samples)."""

  def __init__(self, config, run_dir: str, report, run_data: RunData, resume: Resume | None, stop,
               snapshots):
    self.config, self.run_dir, self.report, self.stop = config, run_dir, report, stop
    self.snapshots, self.splits, self.windows = snapshots, run_data.splits, run_data.windows
    enc = data.get_tokenizer(config.tokenizer)
    (plan, mcfg, model, self.mesh, self.rng, self.state,
     self.train_step) = build_training(config, enc.n_vocab, run_data.total_steps)
    if config.init_from and not resume:
      params, how = hf.initial_params(config, self.state.params)
      self.state = self.state.replace(params=params)
      report.info(f"Initialised from {config.init_from} ({how})")
    self.eval_batch = config.eval_batch_size or config.batch_size
    sharding.check_batch_size(self.eval_batch, self.mesh, "eval_batch_size"
                              if config.eval_batch_size else "batch_size")
    self.rows, self.put_batch = sharding.batch_feeder(self.mesh,
                                                      config_lib.sequences_per_step(config))
    self.eval_step = make_eval_step(model, self.mesh, plan.compiler_options())
    self.sampler = generate.training_sampler(config, mcfg, enc)
    # Whichever criterion stops the run, the final model is then the best epoch's.
    self.restore_best = bool(config.early_stop_restore_best and (
        early_stop.patience_active(config) or early_stop.overfit_active(config)))
    self.count_nonfinite = jax.jit(monitor.nonfinite_counts)
    # The run's identity beside its config: one id from its first start, and the data it reads.
    self.identity = {"config": config.to_dict(),
                     "model": model_info(mcfg, config, enc.n_vocab, plan),
                     "run_id": (resume.meta.get("run_id") if resume else None)
                               or sharding.from_process_0(uuid.uuid4().hex),
                     "data": {"dataset": config.dataset, "fingerprints": run_data.fingerprints}}
    for path in (run_dir, snapshots.directory) if jax.process_index() == 0 else ():
      with open(os.path.join(path, "run_config.json"), "w") as f:
        json.dump(self.identity["config"], f, indent=2)
    self.progress = Progress()
    # A copy: the train step donates (frees) the state's own buffers.
    self.best_params = (jax.tree.map(jnp.copy, self.state.params)
                        if self.restore_best and not resume else None)
    if resume:
      self._restore(resume)
    _log_run_header(report, config, plan, mcfg, enc, self.mesh, self.splits, self.windows,
                    run_data.total_steps, run_dir)
    self.reader = StepReader(config, report, run_data.total_steps, self.stop_nonfinite,
                             self.progress, (len(self.splits["valid"]), len(self.splits["test"])))
    self.resume_hint = (f"Resume with: python -m gptjax.train --output_dir {shlex.quote(run_dir)} "
                        "--resume --yes")

  def _restore(self, resume: Resume) -> None:
    # The target gives structure and sharding only: "best" has the params' own.
    target = {"train": self.state, "best": self.state.params} if self.restore_best else {
        "train": self.state}
    path = checkpoint.snapshot_path(resume.snap_dir, resume.step)
    restored, meta = checkpoint.restore(path, target)
    bad = checkpoint.nonfinite_leaves(restored)
    if bad:
      raise ConfigError(f"checkpoint_file: {path} holds non-finite values (in "
                        f"{', '.join(bad[:3])}); it is damaged: resume from an older snapshot "
                        "with --checkpoint_file")
    self.state, self.best_params = restored["train"], restored.get("best")
    self.progress = Progress.from_meta(meta)
    self.report.info(f"Resumed from step {int(self.state.step)} (epoch {self.progress.epoch + 1}, "
                     f"batch {self.progress.index}) of {path}")
    for field, before, now in resume.changes:
      self.report.info(f"Changed on resume: {field} {before!r} -> {now!r}")

  def stop_nonfinite(self, step: int, where: str, applied: bool):
    """Raises NonFiniteError once the snapshots in flight are on disk (each was checked)."""
    self.snapshots.wait()
    last = self.snapshots.latest_step()
    message = (f"non-finite values at step {step + 1}: {where}; "
               + ("" if applied else "the update was not applied; ")
               + f"last good snapshot: {self.snapshots.path(last) if last is not None else 'none'}."
               " Lower --lr, raise --warmup_steps or set --gradient_clip (e.g. 1.0)")
    self.report.info(f"Training stopped: {message}")
    raise NonFiniteError(message)

  def snapshot(self, val_loss: float | None = None) -> None:
    # The step only refuses non-finite gradients; an update that overflows the weights is
    # caught here at the latest (one pass over the weights), so no snapshot is ever non-finite.
    bad = monitor.nonfinite_where({"loss": 0, "grads": {}, "params": jax.device_get(
        self.count_nonfinite(self.state.params))})
    step = int(self.state.step)
    if bad:
      self.stop_nonfinite(step - 1, bad, applied=True)
    meta = {"step": step, "time": reporting.timestamp(), "val_loss": val_loss,
            **self.progress.to_meta(), **self.identity}
    self.snapshots.save(step, {"train": self.state, "best": self.best_params}
                        if self.restore_best else {"train": self.state}, meta)

  def measure(self, params, split: str) -> float | None:
    """The split's loss, None if a signal stopped it; its pace feeds the ETA."""
    start = time.time()
    loss = evaluate.mean_loss(self.eval_step, params, self.splits[split], self.config.max_seq_len,
                              self.eval_batch, self.mesh, self.stop, desc=f"eval {split}")
    self.reader.eval_pace = (time.time() - start) / len(self.splits[split])
    return loss

  def baseline(self) -> bool:
    """A new run's validation before training, as nanoGPT's iter 0: what every later one is
    compared with. False if a signal stopped it."""
    loss = self.measure(self.state.params, "valid")
    if loss is None:
      return False
    self.progress.initial_val_loss = loss
    self.report.info(f"Before training | val loss {loss:.4f} | val ppl {math.exp(loss):.2f}")
    self.report.scalars(0, {"val/loss": loss, "val/perplexity": math.exp(loss)})
    return True

  def train_epoch(self) -> bool:
    """The current epoch's remaining steps, a snapshot every snapshot_interval; False if a signal
    stopped them (with a snapshot)."""
    config, progress, reader, report = self.config, self.progress, self.reader, self.report
    steps_per_epoch = self.windows.steps_per_epoch
    # tok/s counts training steps only, not the evaluation and snapshot before this epoch.
    reader.restart_clock(int(self.state.step))
    report.start_epoch(progress.epoch + 1, steps_per_epoch, progress.index)
    batches = data.prefetch(self.windows.epoch(progress.epoch, progress.index, self.rows),
                            self.put_batch)
    pending, stopped = None, False
    for batch in batches:
      step = int(self.state.step) if pending is None else pending[0] + 1
      self.state, metrics = self.train_step(self.state, batch, self.rng)
      self.snapshots.check()  # a save that failed in the background stops the run now
      if pending:
        reader(*pending)
      pending = (step, metrics)
      progress.index += 1
      report.progress()
      at_interval = config.snapshot_interval and (step + 1) % config.snapshot_interval == 0
      if self.stop.signum or (at_interval and progress.index < steps_per_epoch):
        reader(*pending)
        pending = None
        self.snapshot()
        if self.stop.signum:
          stopped = True
          break
    if pending:
      reader(*pending)
    report.end_epoch()
    return not stopped

  def end_epoch(self) -> bool:
    """The epoch's validation, early-stopping decision, samples and snapshot; False if a signal
    stopped the validation (the snapshot then resumes at it)."""
    config, progress, report = self.config, self.progress, self.report
    val_loss = self.measure(self.state.params, "valid")
    if val_loss is None:
      self.snapshot()
      return False
    train_loss = self.reader.take_epoch_loss()
    step = int(self.state.step)
    progress.early_stop, improved = early_stop.update(progress.early_stop, config,
                                                      progress.epoch + 1, val_loss, train_loss)
    if improved and self.restore_best:
      self.best_params = jax.tree.map(jnp.copy, self.state.params)
    progress.history.append({"epoch": progress.epoch + 1, "step": step,
                             "train_loss": train_loss, "val_loss": val_loss})
    report.info(f"Epoch {progress.epoch + 1}/{config.epochs} | train loss {train_loss:.4f} | "
                f"val loss {val_loss:.4f} | val ppl {math.exp(val_loss):.2f}"
                + (" (best)" if improved else ""))
    report.scalars(step, {"val/loss": val_loss, "val/perplexity": math.exp(val_loss)})
    for i, (prompt, text) in enumerate(self.sampler(self.state.params) if self.sampler else [], 1):
      report.info(f"Sample {i} | {prompt + text!r}")
      report.text(step, f"samples/{i}", prompt + text)
    progress.epoch, progress.index = progress.epoch + 1, 0
    self.snapshot(val_loss)
    if progress.early_stop.stopped:
      report.info(f"Early stopping after epoch {progress.epoch}: {progress.early_stop.reason}")
    return True

  def interrupted(self) -> dict:
    self.snapshots.wait()
    self.snapshots.check()
    step = int(self.state.step)
    self.report.info(f"Stopped by signal {self.stop.signum} at step {step}; snapshot saved to "
                     f"{self.snapshots.path(step)}. {self.resume_hint}")
    return {"status": "interrupted", "step": step, "history": self.progress.history,
            "signal": self.stop.signum}

  def finish(self) -> dict:
    """The test evaluation of the final weights (the best epoch's where early stopping restores
    them), the final model, and the snapshots' removal."""
    config, progress, report, snapshots = self.config, self.progress, self.report, self.snapshots
    snapshots.wait()
    snapshots.check()
    step, best = int(self.state.step), progress.early_stop
    final_params = self.state.params
    if self.restore_best and best.best_epoch >= 1 and best.best_epoch != progress.epoch:
      final_params = self.best_params
      report.info(f"Restored the best weights: epoch {best.best_epoch} "
                  f"(val loss {best.best_val_loss:.4f})")
    test_loss = self.measure(final_params, "test")
    if test_loss is None:  # the last epoch's snapshot is on disk: a resume finishes the run
      report.info(f"Stopped by signal {self.stop.signum} during the test evaluation, before the "
                  f"final model. {self.resume_hint}")
      return {"status": "interrupted", "step": step, "history": progress.history,
              "signal": self.stop.signum}
    report.info(f"Test loss {test_loss:.4f} | test ppl {math.exp(test_loss):.2f}")
    report.scalars(step, {"test/loss": test_loss, "test/perplexity": math.exp(test_loss)})
    info = dict(self.identity["model"], step=step, epochs=progress.epoch,
                history=progress.history, test_loss=test_loss, config=self.identity["config"],
                run_id=self.identity["run_id"], data=self.identity["data"])
    model_path = checkpoint.save_model(os.path.join(self.run_dir, "models"),
                                       f"model_{report.stamp}", final_params, info)
    report.info(f"Final model saved to {model_path}")
    snapshots.close()
    if config.delete_snapshots_after_training:
      shutil.rmtree(snapshots.directory, ignore_errors=True)
      report.info("Snapshots deleted (keep them with --no_delete_snapshots_after_training)")
    return {"status": "completed", "step": step, "history": progress.history,
            "throughput": self.reader.throughput,
            "initial_val_loss": progress.initial_val_loss, "test_loss": test_loss,
            "model_path": model_path, "params": final_params}
