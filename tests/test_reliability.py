"""A run you can trust: each case of issue 20 as a user or a cluster meets it.

Resume from a relative run directory and from another folder, options and data that would change
the run, two writers in one directory, failures after the last epoch, damaged snapshots and
models, a full disk, signals during evaluation and SIGHUP. Each asserts the outcome (exit code,
one line naming the path and the cause) and that nothing already on disk was lost.
"""
import errno
import glob
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from gptjax import checkpoint, evaluate as evaluate_lib, reporting, rundir, train, trainer
from gptjax.config import ConfigError
from conftest import REPO, SNAPSHOT_RUN, copy_corpus, read_run_log, same_tree

@pytest.fixture(scope="module")
def make_config(make_snapshot_config):
  return make_snapshot_config


def main(argv, capsys) -> tuple[int, str, str]:
  """(exit code, stdout, stderr) of `python -m gptjax.train ARGV`, run in this process."""
  capsys.readouterr()
  try:
    code = train.main(["gptjax.train"] + list(argv))
  except SystemExit as e:
    code = e.code
  out, err = capsys.readouterr()
  return code, out, err


def one_line(err: str) -> str:
  lines = err.strip().splitlines()
  assert len(lines) == 1, lines
  return lines[0]


def cli_args(config) -> list:
  from gptjax.config import FIELDS, base_config
  base = base_config()
  return [f"--{k}={config[k]}" for k in FIELDS if config[k] != base[k]]


def signal_during_step(monkeypatch, number: int, signum=signal.SIGTERM) -> None:
  """Sends `signum` to this process while train step `number` (1-based) runs."""
  make = trainer.make_train_step

  def make_signalling(*args, **kwargs):
    train_step = make(*args, **kwargs)

    def step(state, batch, rng):
      this = int(state.step) + 1
      out = train_step(state, batch, rng)
      if this == number:
        os.kill(os.getpid(), signum)
      return out
    return step
  monkeypatch.setattr(trainer, "make_train_step", make_signalling)


def signal_during_evaluation(monkeypatch, n_tokens: int, call: int = 1) -> None:
  """SIGTERM arrives while the `call`-th evaluation of a split of `n_tokens` tokens runs."""
  real, calls = evaluate_lib.mean_loss, []

  def evaluate(eval_step, params, tokens, *args, **kwargs):
    if len(tokens) == n_tokens:
      calls.append(1)
      if len(calls) == call:
        os.kill(os.getpid(), signal.SIGTERM)
    return real(eval_step, params, tokens, *args, **kwargs)
  monkeypatch.setattr(evaluate_lib, "mean_loss", evaluate)


def snapshot_files(run_dir: str) -> dict:
  """{relative path: bytes} of every snapshot file: what must never be lost."""
  out = {}
  for path in glob.glob(os.path.join(run_dir, "snapshots", "snapshot_*", "**"), recursive=True):
    if os.path.isfile(path):
      with open(path, "rb") as f:
        out[os.path.relpath(path, run_dir)] = f.read()
  return out


def largest_file(directory: str) -> str:
  files = [os.path.join(r, n) for r, _, names in os.walk(directory) for n in names]
  return max(files, key=os.path.getsize)


def flip_bytes(path: str, n: int = 64) -> None:
  with open(path, "r+b") as f:
    blob = bytearray(f.read())
    start = len(blob) // 2
    for i in range(start, min(start + n, len(blob))):
      blob[i] ^= 0xFF
    f.seek(0)
    f.write(blob)


# ----------------------------------------------------------------------------- 1-3: one identity

def test_a_relative_run_resumes_from_anywhere_on_its_own_data_and_settings(
    corpus, make_tiny_config, tmp_path, monkeypatch, capsys):
  """Items 1-3: the hint of a relative --output_dir works from another folder; there a folder of
  the same relative name is other data, a changed lr or batch size is refused, edited files are
  refused unless --allow_data_change, and --epochs is allowed; each change is logged."""
  here, elsewhere = tmp_path / "here", tmp_path / "elsewhere"
  copy_corpus(corpus, here / "data")
  copy_corpus(corpus, elsewhere / "data", n_valid=30, n_test=20)  # same name, other text
  monkeypatch.chdir(here)
  config = make_tiny_config("run")
  config.update(SNAPSHOT_RUN, dataset="data", output_dir="run")
  signal_during_step(monkeypatch, 2)
  code, out, _ = main(cli_args(config), capsys)
  monkeypatch.undo()
  assert code == 128 + signal.SIGTERM
  hint = re.search(r"Resume with: python -m gptjax\.train (.*)$", out, re.M).group(1)
  run_dir = str(here / "run")
  assert shlex.split(hint) == ["--output_dir", run_dir, "--resume", "--yes"]
  before = snapshot_files(run_dir)

  monkeypatch.chdir(elsewhere)
  for option, needle in ((["--lr", "1e-3"], "lr=0.003 but lr=0.001 was given"),
                         (["--batch_size", "4"], "batch_size=8 but batch_size=4 was given"),
                         (["--dataset", "data"], f"dataset={str(here / 'data')!r} but "
                                                 f"dataset={str(elsewhere / 'data')!r}")):
    code, _, err = main(shlex.split(hint) + option, capsys)
    assert code == 2 and needle in one_line(err), err

  train_txt = here / "data" / "train.txt"  # the run's own file, edited since (a line changed
  train_txt.write_text(" An edited line .\n" + train_txt.read_text())  # among those it reads)
  code, _, err = main(shlex.split(hint), capsys)
  assert code == 2
  assert "the train split" in one_line(err) and "--allow_data_change" in err
  assert snapshot_files(run_dir) == before  # every refusal left the snapshots as they were

  code, out, _ = main(shlex.split(hint) + ["--allow_data_change", "--epochs", "3"], capsys)
  assert code == 0
  assert "Changed on resume: epochs 2 -> 3" in out
  assert re.search(r"Changed on resume: train split 'sha256:\w+' -> 'sha256:\w+'", out)
  (model,) = glob.glob(os.path.join(run_dir, "models", "model_*"))
  with open(os.path.join(model, "model.json")) as f:
    info = json.load(f)
  assert info["dataset"] == str(here / "data") and info["epochs"] == 3


# ----------------------------------------------------------------------------- 4: one writer

def test_one_writer_per_run_directory(tiny_config, tmp_path, capsys):
  run_dir = tiny_config.output_dir
  lock = rundir.RunLock(run_dir)  # a run holding the directory
  try:
    code, _, err = main(cli_args(tiny_config), capsys)
    assert code == 2
    line = one_line(err)
    assert f"{run_dir} is in use by another gptjax run (PID {os.getpid()} on" in line
    assert os.listdir(run_dir) == [rundir.LOCK_NAME]  # the second run wrote nothing
    with pytest.raises(ConfigError, match="in use"):
      rundir.check_free(run_dir)  # what --check_only (the launcher's foreground check) runs
  finally:
    lock.release()

  # A holder killed with SIGKILL leaves no stale lock: the OS released it.
  holder = subprocess.Popen(
      [sys.executable, "-c", "import sys, time; from gptjax import rundir; "
       "rundir.RunLock(sys.argv[1]); print('held', flush=True); time.sleep(60)", run_dir],
      stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=REPO))
  try:
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(ConfigError, match=f"PID {holder.pid} on"):
      rundir.RunLock(run_dir)
  finally:
    holder.kill()
    holder.wait()
  rundir.check_free(run_dir)
  rundir.RunLock(run_dir).release()


def test_log_files_of_runs_in_one_second_never_collide(tmp_path):
  first = reporting.Reporter(str(tmp_path), stamp="2026DEC04_120000_GMT+00")
  second = reporting.Reporter(str(tmp_path), stamp="2026DEC04_120000_GMT+00")
  first.info("first")
  second.info("second")
  first.close()
  second.close()
  assert first.log_path != second.log_path
  assert sorted(os.listdir(tmp_path / "logs")) == ["train_2026DEC04_120000_GMT+00.log",
                                                  "train_2026DEC04_120000_GMT+00_1.log"]


# ----------------------------------------------------------------------------- 5, 7: after training

def test_a_run_that_fails_after_its_last_epoch_finishes_on_resume(
    reference, make_config, tmp_path, monkeypatch, capsys):
  """Item 5 and 7: a full disk while the final model is written, then SIGTERM during the test
  evaluation; each time --resume finishes what was left, ending with the reference's model."""
  config = make_config(tmp_path / "run")
  run_dir = config.output_dir

  real_write = checkpoint.write_manifest

  def write_manifest(directory):  # the final model's save meets a full disk
    if os.path.basename(directory).startswith(".model_"):
      raise OSError(errno.ENOSPC, "No space left on device", os.path.join(directory, "params"))
    real_write(directory)
  monkeypatch.setattr(checkpoint, "write_manifest", write_manifest)
  code, _, err = main(cli_args(config), capsys)
  monkeypatch.undo()
  assert code == 1
  line = one_line(err)
  assert "disk full writing" in line and "--resume" in line and "out of memory" not in line
  assert not glob.glob(os.path.join(run_dir, "models", "model_*"))
  before = snapshot_files(run_dir)
  assert before

  # SIGTERM during the test evaluation of the resumed run: it stops, nothing lost.
  from gptjax import data
  n_test = len(data.load_tokens(config.dataset, "test", "gpt2", cache_dir=config.data_cache_dir))
  signal_during_evaluation(monkeypatch, n_test)
  code, out, _ = main(["--output_dir", run_dir, "--resume", "--yes"], capsys)
  monkeypatch.undo()
  assert code == 128 + signal.SIGTERM
  assert "finishing it (test evaluation, final model)" in out
  assert "during the test evaluation, before the final model" in out
  assert snapshot_files(run_dir) == before

  code, out, _ = main(["--output_dir", run_dir, "--resume", "--yes"], capsys)
  assert code == 0
  (model,) = glob.glob(os.path.join(run_dir, "models", "*"))  # no hidden .tmp left either
  params, info = checkpoint.load_params(model)
  assert same_tree(params, reference[1]["params"])
  assert info["test_loss"] == reference[1]["test_loss"]
  code, out, _ = main(["--output_dir", run_dir, "--resume", "--yes"], capsys)
  assert code == 0 and f"This run is finished: 2 of 2 epochs done; its final model is {model}" in out


def test_a_failed_snapshot_save_stops_the_run_at_once(make_config, tmp_path, monkeypatch,
                                                      capsys):
  """Item 7: the disk fills while the second snapshot is written: the run stops at the next step
  (not at the next save) saying so, and the first snapshot is intact."""
  config = make_config(tmp_path / "run", snapshot_interval=2, epochs=1)
  real_write, calls = checkpoint.write_manifest, []

  def write_manifest(directory):
    calls.append(directory)
    if len(calls) == 2:
      raise OSError(errno.ENOSPC, "No space left on device", directory)
    real_write(directory)
  monkeypatch.setattr(checkpoint, "write_manifest", write_manifest)
  make = trainer.make_train_step

  def make_slow(*args, **kwargs):  # steps of a real length: the background save ends in one
    train_step = make(*args, **kwargs)

    def step(*a):
      out = train_step(*a)
      time.sleep(0.5)
      return out
    return step
  monkeypatch.setattr(trainer, "make_train_step", make_slow)
  code, _, err = main(cli_args(config), capsys)
  assert code == 1
  assert "error: disk full writing" in one_line(err) and "snapshot_4" in err
  steps = [int(n) for n in re.findall(r"\| step (\d+)/", read_run_log(config.output_dir))]
  assert max(steps) == 4  # step 5 ran when the failure was seen: the next save was step 6
  snap_dir = os.path.join(config.output_dir, "snapshots")
  assert checkpoint.complete_steps(snap_dir) == [2]
  checkpoint.verify(checkpoint.snapshot_path(snap_dir, 2))


def test_disk_full_is_not_out_of_memory():
  storage = RuntimeError("RESOURCE_EXHAUSTED: Error writing local file: No space left on device")
  assert train.disk_full(storage) == "" and train.out_of_memory(storage)  # disk_full goes first
  assert train.disk_full(RuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating")) is None


# ----------------------------------------------------------------------------- 6: damaged files

def test_damaged_snapshots_are_named_and_an_older_one_resumes(reference, tmp_path, capsys):
  ref_config, _ = reference
  run_dir = str(tmp_path / "run")
  shutil.copytree(ref_config.output_dir, run_dir)
  snap_dir = os.path.join(run_dir, "snapshots")
  *_, older, newest = checkpoint.complete_steps(snap_dir)
  newest_path = checkpoint.snapshot_path(snap_dir, newest)
  flip_bytes(largest_file(os.path.join(newest_path, "state")))
  argv = ["--output_dir", run_dir, "--resume", "--yes", "--epochs", "3"]

  code, _, err = main(argv, capsys)
  assert code == 2
  line = one_line(err)
  assert f"{newest_path} is damaged" in line and "checksum mismatch" in line
  older_path = checkpoint.snapshot_path(snap_dir, older)
  assert f"--checkpoint_file {older_path}" in line

  # A truncated file is named the same way.
  truncated = str(tmp_path / "truncated")
  shutil.copytree(newest_path, truncated + f"/snapshot_{newest}")
  victim = largest_file(truncated + f"/snapshot_{newest}/state")
  os.truncate(victim, os.path.getsize(victim) // 2)
  code, _, err = main(["--checkpoint_file", truncated + f"/snapshot_{newest}", "--yes",
                       "--output_dir", str(tmp_path / "other")], capsys)
  assert code == 2 and "bytes," in one_line(err) and "were written" in err

  # Choosing the older snapshot resumes from it; the damaged later one is moved aside, kept.
  damaged = snapshot_files(run_dir)[os.path.relpath(largest_file(
      os.path.join(newest_path, "state")), run_dir)]
  code, out, _ = main(["--checkpoint_file", older_path, "--yes", "--epochs", "3",
                       "--output_dir", run_dir], capsys)
  assert code == 0 and f"Resumed from step {older} " in out
  (aside,) = glob.glob(snap_dir + "_set_aside_*")
  assert f"Snapshots later than step {older} moved aside to {aside}" in out
  moved = checkpoint.snapshot_path(aside, newest)
  with open(largest_file(os.path.join(moved, "state")), "rb") as f:
    assert f.read() == damaged


def test_damaged_or_non_finite_models_are_refused(reference, tmp_path, capsys):
  _, ref = reference
  model = str(tmp_path / "model")
  shutil.copytree(ref["model_path"], model)
  flip_bytes(largest_file(os.path.join(model, "params")))
  capsys.readouterr()
  with pytest.raises(SystemExit) as exit_:
    evaluate_lib.main(["gptjax.evaluate", "--model", model, "--json"])
  assert exit_.value.code == 2
  line = one_line(capsys.readouterr().err)
  assert line.startswith(f"error: model: {model} is damaged: params/")

  params = {"w": np.full((2, 2), np.nan, np.float32), "b": np.zeros(2, np.float32)}
  path = checkpoint.save_model(str(tmp_path / "models"), "model_nan", params, {"ok": 1})
  checkpoint.verify(path)  # its files are as written: the weights themselves are bad
  with pytest.raises(checkpoint.DamagedError, match=r"holds non-finite weights \(in \['w'\]\)"):
    checkpoint.load_params(path)


def test_evaluate_on_a_snapshot_uses_the_runs_max_samples(reference):
  """Item 11: a snapshot and the final model of the same weights give the same numbers."""
  config, ref = reference
  snap = checkpoint.snapshot_path(os.path.join(config.output_dir, "snapshots"), ref["step"])
  kwargs = dict(split="train", data_cache_dir=config.data_cache_dir)
  from_snapshot = evaluate_lib.evaluate_model(snap, **kwargs)
  from_model = evaluate_lib.evaluate_model(ref["model_path"], **kwargs)
  assert from_snapshot["tokens"] == from_model["tokens"]
  assert from_snapshot["loss"] == from_model["loss"]


# ----------------------------------------------------------------------------- 8: signals

def test_sighup_saves_and_a_second_signal_stops_at_once(make_config, tmp_path, monkeypatch,
                                                        capsys):
  config = make_config(tmp_path / "run")
  signal_during_step(monkeypatch, 2, signal.SIGHUP)
  code, out, _ = main(cli_args(config), capsys)
  assert code == 128 + signal.SIGHUP
  assert "Stopped by signal 1 at step 2" in out
  assert checkpoint.complete_steps(os.path.join(config.output_dir, "snapshots")) == [2]

  with trainer._StopSignal() as stop:
    os.kill(os.getpid(), signal.SIGINT)
    assert stop.signum == signal.SIGINT
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(1)  # the handler runs between bytecodes; it raises before this ends


def test_a_signal_during_validation_snapshots_and_resumes_exactly(
    reference, make_config, tmp_path, monkeypatch):
  from gptjax import data
  config = make_config(tmp_path / "run")
  n_valid = len(data.load_tokens(config.dataset, "valid", "gpt2", cache_dir=config.data_cache_dir))
  signal_during_evaluation(monkeypatch, n_valid, call=2)  # epoch 1's validation
  first = trainer.train_and_evaluate(config.copy_and_resolve_references())
  monkeypatch.undo()
  spe = reference[1]["history"][0]["step"]
  assert (first["status"], first["step"], first["history"]) == ("interrupted", spe, [])
  meta = checkpoint.read_meta(checkpoint.snapshot_path(
      os.path.join(config.output_dir, "snapshots"), spe))
  assert (meta["epoch"], meta["index"]) == (0, spe)  # resumes at the validation

  resumed = config.copy_and_resolve_references()
  resumed.update(resume=True, yes=True)
  second = trainer.train_and_evaluate(resumed)
  assert second["history"] == reference[1]["history"]
  assert same_tree(second["params"], reference[1]["params"])


# ----------------------------------------------------------------------------- 9: one line

def test_start_failures_are_one_line(tiny_config, tmp_path, monkeypatch, capsys):
  a_file = tmp_path / "a_file"
  a_file.write_text("not a directory")
  code, _, err = main(cli_args(tiny_config) + ["--output_dir", str(a_file)], capsys)
  assert code == 2 and f"output_dir: {a_file} is a file" in one_line(err)
  assert a_file.read_text() == "not a directory"

  def full(run_dir):
    raise OSError(errno.ENOSPC, "No space left on device", os.path.join(run_dir, ".lock"))
  monkeypatch.setattr(rundir, "RunLock", full)
  code, _, err = main(cli_args(tiny_config), capsys)
  assert code == 1
  assert f"disk full writing {tiny_config.output_dir}/.lock" in one_line(err)
