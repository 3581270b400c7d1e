"""Snapshots and resume: a run that stops, for whatever reason, continues as if it never had.

One uninterrupted run (`reference`) is the yardstick. Other runs of the same config stop on a
real SIGTERM, either sent to this process while a chosen train step runs (the trainer's own
handler receives it, as from a scheduler's preemption) or sent to a `python -m gptjax.train`
subprocess, or die by SIGKILL in the middle of writing a snapshot. Every one resumes through the
real --resume path and must end with the reference's parameters, bit for bit, and its per-epoch
losses. All runs share one persistent XLA cache, so each compiles the tiny programs once.
"""
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from gptjax import checkpoint, optim, train, trainer
from gptjax.config import FIELDS, ConfigError, base_config
from conftest import REPO, same_tree

TMP_SUFFIX = ".orbax-checkpoint-tmp"  # how Orbax names a snapshot still being written
SNAPSHOT_RE = re.compile(r"^snapshot_(\d+)$")
TIMEOUT_S = 300


@pytest.fixture(scope="module")
def make_config(make_snapshot_config):
  return make_snapshot_config


def resume_of(config, **changes):
  config = config.copy_and_resolve_references()
  config.update(resume=True, yes=True, **changes)
  return config


def steps_per_epoch(result) -> int:
  return result["history"][0]["step"]


def assert_same_run(history, params, test_loss, reference):
  """Bit-identical parameters and the same per-epoch losses as the reference run."""
  ref = reference[1]
  diff = max(jax.tree.leaves(jax.tree.map(
      lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))), params, ref["params"])))
  print(f"max |param diff| {diff}; val losses {[h['val_loss'] for h in history]} (resumed) vs "
        f"{[h['val_loss'] for h in ref['history']]} (uninterrupted); test loss {test_loss} vs "
        f"{ref['test_loss']}")
  assert same_tree(params, ref["params"])
  assert history == ref["history"]  # epoch, step, train and validation loss of every epoch
  assert test_loss == ref["test_loss"]


def sigterm_during_step(monkeypatch, number: int) -> None:
  """Sends SIGTERM to this process while train step `number` (1-based) runs, from inside the
  trainer's loop, so the stop lands on a known step; the trainer's handler receives it."""
  make = trainer.make_train_step

  def make_stopping(*args, **kwargs):
    train_step = make(*args, **kwargs)

    def step(state, batch, rng):
      this = int(state.step) + 1  # read before the call, which donates `state`
      out = train_step(state, batch, rng)
      if this == number:
        assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None)  # else: pytest dies
        os.kill(os.getpid(), signal.SIGTERM)
      return out
    return step

  monkeypatch.setattr(trainer, "make_train_step", make_stopping)


def cli_args(config) -> list:
  """`config` as command-line options: every field that differs from the defaults."""
  base = base_config()
  return [f"--config.{k}={config[k]}" for k in FIELDS if config[k] != base[k]]


def start_cli(config, stdout_path, xla_cache):
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu", **xla_cache)
  with open(stdout_path, "w") as out:
    return subprocess.Popen([sys.executable, "-m", "gptjax.train"] + cli_args(config),
                            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                            env=env, cwd=os.path.dirname(config.output_dir))


def snapshot_names(config):
  return os.listdir(os.path.join(config.output_dir, "snapshots"))


def listed_steps(names) -> list:
  """Steps of the `snapshot_<step>` names among `names` (not the temporary ones)."""
  return sorted(int(m.group(1)) for m in map(SNAPSHOT_RE.match, names) if m)


def test_rotation_keeps_the_newest(reference):
  config, result = reference
  spe, total = steps_per_epoch(result), result["step"]
  # Every snapshot_interval steps inside an epoch, and at the end of every epoch.
  written = sorted(set(range(config.snapshot_interval, total, config.snapshot_interval))
                   | set(range(spe, total + 1, spe)))
  assert len(written) > config.keep_last_n_snapshots
  names = snapshot_names(config)
  assert listed_steps(names) == written[-config.keep_last_n_snapshots:]
  assert sorted(n for n in names if not SNAPSHOT_RE.match(n)) == ["run_config.json"]
  last = checkpoint.read_meta(checkpoint.snapshot_path(os.path.join(config.output_dir,
                                                                    "snapshots"), total))
  assert (last["step"], last["epoch"], last["index"]) == (total, config.epochs, 0)


def test_sigterm_mid_epoch_then_at_epoch_boundary_resumes_exactly(
    reference, make_config, tmp_path, monkeypatch):
  spe = steps_per_epoch(reference[1])
  config = make_config(tmp_path / "run")

  sigterm_during_step(monkeypatch, 2)
  first = trainer.train_and_evaluate(config.copy_and_resolve_references())
  assert (first["status"], first["step"], first["signal"]) == ("interrupted", 2, signal.SIGTERM)

  monkeypatch.undo()
  sigterm_during_step(monkeypatch, spe)  # the last step of epoch 1, before its validation
  second = trainer.train_and_evaluate(resume_of(config))
  assert (second["status"], second["step"], second["history"]) == ("interrupted", spe, [])
  meta = checkpoint.read_meta(os.path.join(config.output_dir, "snapshots", f"snapshot_{spe}"))
  assert (meta["epoch"], meta["index"]) == (0, spe)

  monkeypatch.undo()
  third = trainer.train_and_evaluate(resume_of(config))
  assert third["status"] == "completed"
  assert_same_run(third["history"], third["params"], third["test_loss"], reference)


def test_sigkill_while_saving_leaves_a_resumable_run(reference, make_config, tmp_path,
                                                     xla_cache, capsys):
  config = make_config(tmp_path / "run", snapshot_interval=1, keep_last_n_snapshots=2)
  proc = start_cli(config, tmp_path / "stdout.txt", xla_cache)
  deadline = time.time() + TIMEOUT_S
  try:
    while True:  # kill it while a snapshot is half written, once a complete one exists
      names = os.listdir(os.path.join(config.output_dir, "snapshots")) \
          if os.path.isdir(os.path.join(config.output_dir, "snapshots")) else []
      if listed_steps(names) and any(TMP_SUFFIX in n for n in names):
        proc.kill()
        break
      assert proc.poll() is None, (tmp_path / "stdout.txt").read_text()
      assert time.time() < deadline
      time.sleep(0.002)
  finally:
    proc.kill()
    proc.wait()
  assert proc.returncode == -signal.SIGKILL
  names = snapshot_names(config)
  half = [int(re.match(r"snapshot_(\d+)", n).group(1)) for n in names if TMP_SUFFIX in n]
  complete = listed_steps(names)
  assert half and complete and max(complete) < min(half), names
  assert checkpoint.complete_steps(os.path.join(config.output_dir, "snapshots")) == complete

  capsys.readouterr()
  resumed = trainer.train_and_evaluate(resume_of(config))
  assert f"Resumed from step {max(complete)} " in capsys.readouterr().out
  assert not [n for n in snapshot_names(config) if TMP_SUFFIX in n]  # cleaned up
  assert_same_run(resumed["history"], resumed["params"], resumed["test_loss"], reference)


def test_sigterm_to_the_cli_saves_exits_and_its_hint_resumes(reference, make_config,
                                                              tmp_path, xla_cache, capsys):
  config = make_config(tmp_path / "run", snapshot_interval=0)
  stdout = tmp_path / "stdout.txt"
  proc = start_cli(config, stdout, xla_cache)
  try:
    deadline = time.time() + TIMEOUT_S
    while "| step 1/" not in stdout.read_text():  # the loop is running
      assert proc.poll() is None, stdout.read_text()
      assert time.time() < deadline
      time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=TIMEOUT_S) == 128 + signal.SIGTERM, stdout.read_text()
  finally:
    proc.kill()
    proc.wait()
  log = stdout.read_text()
  stopped = re.search(r"Stopped by signal 15 at step (\d+); snapshot saved to (\S+)\. "
                      r"Resume with: (python -m gptjax\.train .*)$", log, re.M)
  assert stopped, log
  step, path, hint = int(stopped.group(1)), stopped.group(2), stopped.group(3)
  assert checkpoint.read_meta(path)["step"] == step
  assert shlex.split(hint)[3:] == ["--output_dir", config.output_dir, "--resume", "--yes"]

  # Without --yes and without a terminal to ask on, it refuses in one line.
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
  refused = subprocess.run([sys.executable, "-m", "gptjax.train", "--output_dir",
                            config.output_dir, "--resume"], stdin=subprocess.DEVNULL,
                           capture_output=True, text=True, env=env, timeout=TIMEOUT_S)
  assert refused.returncode == 2, refused.stderr
  assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr
  assert "not a terminal" in refused.stderr and "--yes" in refused.stderr

  # The hint, exactly as logged, continues the same run: everything else comes from the snapshot.
  capsys.readouterr()
  assert train.main(shlex.split(hint)[2:]) == 0
  assert f"Resumed from step {step} " in capsys.readouterr().out
  (model_dir,) = os.listdir(os.path.join(config.output_dir, "models"))
  params, info = checkpoint.load_params(os.path.join(config.output_dir, "models", model_dir))
  assert_same_run(info["history"], params, info["test_loss"], reference)


def test_finished_runs_conflicts_and_a_longer_schedule(reference, tmp_path, capsys):
  ref_config, ref = reference
  run = str(tmp_path / "run")
  shutil.copytree(ref_config.output_dir, run)
  argv = ["gptjax.train", "--output_dir", run, "--resume", "--yes"]

  capsys.readouterr()
  assert train.main(argv) == 0
  assert "This run is finished: 2 of 2 epochs done" in capsys.readouterr().out

  for option, saved, given in (("--d_model=64", "d_model=32", "d_model=64"),
                               ("--tokenizer=gpt4", "tokenizer='gpt2'", "tokenizer='gpt4'")):
    with pytest.raises(SystemExit) as exit_:
      train.main(argv + [option])
    assert exit_.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert saved in line and given in line, line

  # Run length may change: a third epoch, and the lr schedule stretched over three epochs.
  assert train.main(argv + ["--epochs", "3"]) == 0
  out = capsys.readouterr().out
  spe = steps_per_epoch(ref)
  schedule = optim.lr_schedule(ref_config.lr, ref_config.warmup_steps, 3 * spe,
                               ref_config.min_lr_ratio)
  old = optim.lr_schedule(ref_config.lr, ref_config.warmup_steps, 2 * spe, ref_config.min_lr_ratio)
  logged = [(int(n), int(total), lr) for n, total, lr in
            re.findall(r"\| step (\d+)/(\d+) \|.*\| lr (\S+) \|", out)]
  assert [n for n, _, _ in logged] == list(range(2 * spe + 1, 3 * spe + 1))
  assert all(total == 3 * spe and lr == f"{float(schedule(n - 1)):.2e}" for n, total, lr in logged)
  assert any(lr != f"{float(old(n - 1)):.2e}" for n, _, lr in logged)
  models = sorted(os.listdir(os.path.join(run, "models")))
  with open(os.path.join(run, "models", models[-1], "model.json")) as f:
    history = json.load(f)["history"]
  assert history[:2] == ref["history"] and [h["epoch"] for h in history] == [1, 2, 3]


def test_bad_resume_targets_are_one_line_errors(reference, tmp_path, capsys):
  ref_config, _ = reference
  ref_snapshots = os.path.join(ref_config.output_dir, "snapshots")
  newest = listed_steps(os.listdir(ref_snapshots))[-1]
  foreign = tmp_path / "snapshot_7"
  for item in ("state", "meta"):
    (foreign / item).mkdir(parents=True)
    (foreign / item / "data").write_text("not a snapshot")
  truncated = tmp_path / "copy" / f"snapshot_{newest}"
  shutil.copytree(os.path.join(ref_snapshots, f"snapshot_{newest}"), truncated)
  for root, _, files in os.walk(truncated / "state"):
    for name in files:
      open(os.path.join(root, name), "w").close()
  cases = {
      "no snapshot to resume": ["--output_dir", str(tmp_path / "empty"), "--resume"],
      "not a gptjax snapshot": ["--checkpoint_file", str(tmp_path)],
      "not a complete gptjax save": ["--checkpoint_file", str(foreign)],
      f"snapshot_{newest} is damaged: state/": [
          "--checkpoint_file", str(truncated), "--epochs", "3", "--output_dir",
          str(tmp_path / "out")],
  }
  for needle, args in cases.items():
    with pytest.raises(SystemExit) as exit_:
      train.main(["gptjax.train", "--yes"] + args)
    assert exit_.value.code == 2, needle
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], (needle, lines)


def test_final_model_appears_only_complete(tmp_path):
  models = tmp_path / "models"
  params = {"w": np.ones((4, 4), np.float32)}
  with pytest.raises(TypeError):  # the description fails after the weights are written
    checkpoint.save_model(str(models), "model_X", params, {"bad": object()})
  assert "model_X" not in os.listdir(models)
  path = checkpoint.save_model(str(models), "model_X", params, {"ok": 1})
  assert sorted(os.listdir(models)) == ["model_X"]
  loaded, info = checkpoint.load_params(path)
  assert info == {"ok": 1} and np.array_equal(loaded["w"], params["w"])


def test_a_new_run_over_earlier_snapshots_is_refused(reference):
  """Without a terminal, a run that finds snapshots neither overwrites nor mixes with them."""
  config, _ = reference
  fresh = config.copy_and_resolve_references()
  fresh.update(resume=False, yes=False)
  before = snapshot_names(config)
  with pytest.raises(ConfigError, match=r"holds snapshots .*--resume --yes"):
    trainer.check(fresh)
  assert snapshot_names(config) == before


def test_the_cli_asks_at_a_terminal_the_library_never_does(reference, tmp_path, monkeypatch,
                                                          capsys):
  """The prompt lives in the CLI: at a terminal it asks (no is the default); from Python,
  resuming needs yes=True."""
  ref_config, _ = reference
  run = str(tmp_path / "run")
  shutil.copytree(ref_config.output_dir, run)
  shutil.rmtree(os.path.join(run, "models"))  # training done, no final model: resume finishes it
  monkeypatch.setattr(sys.stdin, "isatty", lambda: True)
  answers = iter(["", "y"])
  monkeypatch.setattr("builtins.input", lambda question: next(answers))
  with pytest.raises(SystemExit) as exit_:
    train.main(["gptjax.train", "--output_dir", run])  # Enter: no
  assert exit_.value.code == 2
  assert "resume: not confirmed; nothing was loaded" in capsys.readouterr().err
  assert train.main(["gptjax.train", "--output_dir", run]) == 0  # y: resumed and finished
  assert "Found snapshot" in capsys.readouterr().out
  assert len(os.listdir(os.path.join(run, "models"))) == 1

  config = ref_config.copy_and_resolve_references()
  config.update(output_dir=run, resume=True, yes=False)
  with pytest.raises(ConfigError, match="add --yes"):
    trainer.train_and_evaluate(config)
