"""Tests of run/run_train_lm.sh, the nohup launcher of `python -m gptjax.train`.

Most tests run a copy of the launcher inside a throw-away project root (tmp_path/proj) with
$PYTHON pointing at a stub that records how it was called, so they check the exact mapping
onto the Python CLI, the output/log paths and the background launch in well under a second
each, without the real trainer and without writing into the repository. The stub names the run
directory on --check_only's last line as the trainer does (for the cases used here). The tests
marked `needs_trainer` use the real `gptjax.train` and are skipped until gptjax/train.py exists.
"""
import glob
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time

import pytest

from conftest import REPO
from gptjax.config import FIELDS

LAUNCHER = os.path.join(REPO, "run", "run_train_lm.sh")
TRAINER = os.path.join(REPO, "gptjax", "train.py")
REAL_RUN_TIMEOUT_S = float(os.environ.get("GPTJAX_LAUNCHER_TEST_TIMEOUT", "120"))

OPTIONS = {  # wrapper option -> the trainer's fields whose defaults --help shows for it
    "--preset": (),
    "--dataset": ("dataset",),
    "--epochs": ("epochs",),
    "--batch_size": ("batch_size",),
    "--lr": ("lr",),
    "--warmup": ("warmup_steps",),
    "--snapshot": ("snapshot_interval",),
    "--monitor_interval": ("gradient_monitor", "gradient_monitor_interval", "weight_monitor",
                           "weight_monitor_interval"),
    "--sanity_check_interval": ("sanity_check_interval",),
    "--help": (),
}
# Every trainer flag a wrapper option maps onto: none may reach the trainer untyped.
WRAPPER_FLAGS = ("--model_preset", "--dataset", "--epochs", "--batch_size", "--lr",
                 "--warmup_steps", "--snapshot_interval", "--gradient_monitor",
                 "--gradient_monitor_interval", "--weight_monitor", "--weight_monitor_interval",
                 "--sanity_check_interval")
LOG_NAME_RE = re.compile(r"^train_\d{4}[A-Z]{3}\d{2}_\d{6}_GMT\+00\.log$")

needs_trainer = pytest.mark.skipif(not os.path.isfile(TRAINER),
                                   reason="gptjax/train.py (the Python trainer) does not exist yet")

# Stands in for the Python interpreter: `stub -m gptjax.train ARGS...`. It appends one JSON
# line per call to $FAKE_RECORD; with --check_only it fails when $FAKE_CHECK_RC is set, else
# names the run directory as the trainer does (the last --output_dir, else result/lm_ of the
# dataset's base name, of the tiny preset's wikitext, or of the default wikitext-103), unless
# $FAKE_NO_OUTPUT_DIR is set; the run itself sleeps $FAKE_SLEEP seconds, or fails at once when
# $FAKE_RUN_RC is set.
STUB = r'''
import json, os, sys, time
args = sys.argv[1:]
def value(name):
  found = None
  for i, a in enumerate(args):
    if a == name and i + 1 < len(args):
      found = args[i + 1]
    elif a.startswith(name + "="):
      found = a.partition("=")[2]
  return found
rec = {"args": args, "cwd": os.getcwd(), "pid": os.getpid(),
       "check_only": "--check_only" in args,
       "env": {k: os.environ.get(k) for k in ("PYTHONPATH", "TIKTOKEN_CACHE_DIR")}}
with open(os.environ["FAKE_RECORD"], "a") as f:
  f.write(json.dumps(rec) + "\n")
if rec["check_only"]:
  rc = int(os.environ.get("FAKE_CHECK_RC", "0"))
  if rc:
    print("usage: train.py [-h] ...", file=sys.stderr)
    print("some warning on stdout")
    print("model_preset: 'x' is not allowed; allowed: tiny, small, medium", file=sys.stderr)
  elif not os.environ.get("FAKE_NO_OUTPUT_DIR"):
    dataset = value("--dataset") or (
        "wikitext" if value("--model_preset") == "tiny" else "wikitext-103")
    out = value("--output_dir") or os.path.join(
        "result", "lm_" + os.path.basename(os.path.normpath(dataset)))
    print("output_dir: " + os.path.abspath(out))
  sys.exit(rc)
if os.environ.get("FAKE_RUN_RC"):
  print("Restoring snapshot result/x/snapshots/snapshot_5 ...")
  print("error: checkpoint_file: cannot restore snapshot_5 (ValueError)", file=sys.stderr)
  sys.exit(int(os.environ["FAKE_RUN_RC"]))
print("step 1 | loss 10.0")
print("warning on stderr", file=sys.stderr)
time.sleep(float(os.environ.get("FAKE_SLEEP", "0")))
print("Final model saved to somewhere")
'''


def _clean_env(**extra):
  env = {k: v for k, v in os.environ.items()
         if k not in ("PYTHON", "TIKTOKEN_CACHE_DIR", "FAKE_RECORD", "FAKE_CHECK_RC", "FAKE_SLEEP",
                      "FAKE_RUN_RC", "FAKE_NO_OUTPUT_DIR")}
  env.update(extra)
  return env


def _run(launcher, args, cwd, env, timeout=60):
  return subprocess.run([launcher, *args], cwd=cwd, env=env, capture_output=True, text=True,
                        timeout=timeout)


def _ended(pid):
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return True
  except PermissionError:
    return False
  try:  # a zombie nobody reaps yet counts as ended
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[0] == "Z"
  except OSError:
    return True


def _wait_pid(pid, timeout):
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if _ended(pid):
      return True
    time.sleep(0.1)
  return False


def _printed(stdout, label):
  m = re.search(rf"^\s*{label}:\s+(.+?)\s*$", stdout, re.M)
  assert m, f"no '{label}:' line in launcher output:\n{stdout}"
  return m.group(1)


class FakeProject:
  """tmp_path/proj holding a copy of run/run_train_lm.sh, and a folder `shared` beside it (as a
  developer's checkout has) that the launcher must not read."""

  def __init__(self, tmp_path):
    self.tmp = tmp_path
    self.root = tmp_path / "proj"
    (self.root / "run").mkdir(parents=True)
    self.launcher = str(self.root / "run" / "run_train_lm.sh")
    shutil.copy2(LAUNCHER, self.launcher)
    self.tiktoken = tmp_path / "shared" / "data" / "tiktoken_cache"
    self.tiktoken.mkdir(parents=True)
    self.stub = tmp_path / "bin" / "fakepython"
    self.stub.parent.mkdir()
    self.stub.write_text(f"#!{sys.executable}\n{STUB}")
    self.stub.chmod(self.stub.stat().st_mode | stat.S_IXUSR)
    self.record = tmp_path / "calls.jsonl"
    self.elsewhere = tmp_path / "elsewhere"
    self.elsewhere.mkdir()

  def env(self, **extra):
    base = {"PYTHON": str(self.stub), "FAKE_RECORD": str(self.record)}
    base.update(extra)
    return _clean_env(**base)

  def run(self, args, cwd=None, **extra_env):
    return _run(self.launcher, args, str(cwd or self.elsewhere), self.env(**extra_env))

  def calls(self):
    if not self.record.exists():
      return []
    return [json.loads(line) for line in self.record.read_text().splitlines()]

  def launched(self, args, cwd=None, **extra_env):
    """Runs the launcher, waits for the background stub; returns (stdout, check, train, log).
    The run gets the checked command with the run directory and the log appended."""
    r = self.run(args, cwd=cwd, **extra_env)
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    pid = int(_printed(r.stdout, "PID"))
    assert _wait_pid(pid, 30)
    calls = self.calls()
    assert [c["check_only"] for c in calls] == [True, False], calls
    check, train = calls
    assert train["pid"] == pid
    log = _printed(r.stdout, "Log")
    out = _printed(r.stdout, "Output dir")
    assert train["args"][-4:] == ["--output_dir", out, "--log_file", log]
    assert check["args"] == train["args"][:-4] + ["--check_only"]
    return r.stdout, check, train, log

  def result_files(self):
    """Everything under proj/result (the default output root); [] when it does not exist."""
    found = []
    for dirpath, dirnames, filenames in os.walk(self.root / "result"):
      found += [os.path.join(dirpath, n) for n in dirnames + filenames]
    return [str(self.root / "result")] + sorted(found) if (self.root / "result").exists() else []


@pytest.fixture
def proj(tmp_path):
  return FakeProject(tmp_path)


def _expected_args(output_dir, log_file, *typed):
  """The trainer's command line: what was typed (mapped), then the run directory and the log."""
  return ["-m", "gptjax.train", *typed, "--output_dir", str(output_dir), "--log_file", log_file]


# ------------------------------------------------------------------------------------ help


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_lists_every_option_with_the_trainers_default(flag, tmp_path):
  r = _run(LAUNCHER, [flag], str(tmp_path), _clean_env())
  assert r.returncode == 0, r.stderr
  assert os.access(LAUNCHER, os.X_OK)
  out = r.stdout
  assert "Usage" in out and "-h, --help" in out
  lines = out.splitlines()
  starts = [i for i, l in enumerate(lines) if re.match(r"^  (-h, )?--", l)]
  for option, fields in OPTIONS.items():
    (i,) = [i for i in starts if re.match(rf"^\s+(-h, )?{re.escape(option)}\b", lines[i])]
    if not fields:
      continue
    # the option's lines, up to the next option: the defaults, as gptjax/config.py has them
    text = " ".join(" ".join(lines[i:min(j for j in starts + [len(lines)] if j > i)]).split())
    assert "(default: the trainer's" in text or "else the trainer's" in text, (option, text)
    for field in fields:
      assert f"{field}={FIELDS[field][0]}" in text, (option, field, text)
  assert "--" in out and "gptjax.train" in out
  assert not (tmp_path / "result").exists()


# ------------------------------------------------------------------------------ bad inputs

BAD_INPUTS = [
    ["--epochs", "abc"],
    ["--epochs", "0"],
    ["--epochs", "-3"],
    ["--epochs", "2.5"],
    ["--epochs"],
    ["--preset", "huge"],
    ["--preset=huge"],
    ["--batch_size", "0"],
    ["--batch_size", "x"],
    ["--lr", "fast"],
    ["--lr", "-1e-3"],
    ["--warmup", "-1"],
    ["--warmup", "1.5"],
    ["--snapshot", "often"],
    ["--monitor_interval", "0"],
    ["--sanity_check_interval", "-1"],
    ["--dataset", ""],
    ["--bogus"],
    ["--max_samples", "100"],  # a trainer flag before `--`
    ["stray"],
    ["--preset", "tiny", "--epochs", "abc", "--", "--max_samples", "10"],
]


@pytest.mark.parametrize("args", BAD_INPUTS, ids=lambda a: " ".join(a) or "empty")
def test_bad_input_exits_2_and_starts_nothing(proj, args):
  r = proj.run(args)
  assert r.returncode == 2, (r.stdout, r.stderr)
  assert r.stdout == ""
  assert len(r.stderr.strip().splitlines()) == 1, r.stderr
  assert proj.calls() == []  # python never ran, not even --check_only
  assert proj.result_files() == []


@pytest.mark.parametrize("args", [["--epochs", "abc"], ["--preset", "huge"], ["--bogus"]])
def test_bad_input_real_launcher_writes_no_log(tmp_path, args):
  before = set(glob.glob(os.path.join(REPO, "result", "**", "*.log"), recursive=True))
  r = _run(LAUNCHER, args, str(tmp_path), _clean_env(PYTHON="/nonexistent/python"))
  assert r.returncode == 2, r.stderr
  assert len(r.stderr.strip().splitlines()) == 1
  assert set(glob.glob(os.path.join(REPO, "result", "**", "*.log"), recursive=True)) == before


def test_check_only_rejection_is_reported_as_one_line_exit_2(proj):
  r = proj.run(["--preset", "tiny", "--", "--output_dir", str(proj.tmp / "out")],
               FAKE_CHECK_RC="2")
  assert r.returncode == 2
  assert r.stdout == ""
  assert r.stderr.strip().splitlines() == [
      "run_train_lm.sh: error: model_preset: 'x' is not allowed; allowed: tiny, small, medium"]
  assert [c["check_only"] for c in proj.calls()] == [True]  # nothing launched
  assert not (proj.tmp / "out").exists()
  assert proj.result_files() == []


def test_check_only_crash_exits_1_and_starts_nothing(proj):
  r = proj.run([], FAKE_CHECK_RC="1")
  assert r.returncode == 1
  assert len(r.stderr.strip().splitlines()) == 1
  assert [c["check_only"] for c in proj.calls()] == [True]
  assert proj.result_files() == []


def test_missing_python_exits_1(proj):
  env = proj.env(PYTHON=str(proj.tmp / "no-such-python"))
  r = _run(proj.launcher, [], str(proj.elsewhere), env)
  assert r.returncode == 1
  assert len(r.stderr.strip().splitlines()) == 1
  assert proj.result_files() == []


# ------------------------------------------------------------------------- CLI mapping


def test_no_options_pass_nothing_and_the_trainer_names_the_run_directory(proj):
  stdout, check, train, log = proj.launched([])
  out = proj.root / "result" / "lm_wikitext-103"  # the trainer's default dataset
  assert os.path.dirname(log) == str(out / "logs")
  assert LOG_NAME_RE.match(os.path.basename(log)), log
  assert check["args"] == ["-m", "gptjax.train", "--check_only"]
  assert train["args"] == _expected_args(out, log)


def test_no_default_is_passed_that_was_not_typed(proj):
  # Issue 22: the launcher passed its own copy of the trainer's defaults (warmup 0 against the
  # trainer's 1000, snapshots every 10000 steps against 0, both monitors on) to every new run.
  _, check, train, log = proj.launched(["--lr", "6e-4", "--", "--max_samples", "100"])
  assert train["args"] == _expected_args(proj.root / "result" / "lm_wikitext-103", log,
                                         "--lr", "6e-4", "--max_samples", "100")
  passed = {a.partition("=")[0] for a in check["args"]}
  assert passed & set(WRAPPER_FLAGS) == {"--lr"}


def test_preset_alone_keeps_the_presets_dataset_and_run_directory(proj):
  # Before: `--preset tiny` trained on the launcher's wikitext-103, not the preset's wikitext.
  _, check, train, log = proj.launched(["--preset", "tiny"])
  assert "--dataset" not in check["args"]
  assert train["args"] == _expected_args(proj.root / "result" / "lm_wikitext", log,
                                         "--model_preset", "tiny")


def test_all_options_and_passthrough(proj):
  stdout, check, train, log = proj.launched(
      ["--preset", "small", "--dataset=wikitext", "--epochs", "3", "--batch_size=8",
       "--lr", "6e-4", "--warmup", "4000", "--snapshot", "0", "--monitor_interval", "500",
       "--sanity_check_interval=0", "--", "--max_samples", "100", "--d_model", "64",
       "--early_stopping"])
  out = proj.root / "result" / "lm_wikitext"
  assert log.startswith(str(out / "logs" / "train_"))
  assert train["args"] == _expected_args(
      out, log, "--model_preset", "small", "--dataset", "wikitext", "--epochs", "3",
      "--batch_size", "8", "--lr", "6e-4", "--warmup_steps", "4000", "--snapshot_interval", "0",
      "--gradient_monitor", "--gradient_monitor_interval", "500",
      "--weight_monitor", "--weight_monitor_interval", "500", "--sanity_check_interval", "0",
      "--max_samples", "100", "--d_model", "64", "--early_stopping")


def test_check_only_without_the_run_directory_exits_1_and_starts_nothing(proj):
  r = proj.run([], FAKE_NO_OUTPUT_DIR="1")
  assert r.returncode == 1
  assert r.stderr.strip().splitlines() == [
      "run_train_lm.sh: error: python -m gptjax.train --check_only did not name the run "
      "directory (no 'output_dir: PATH' line)"]
  assert [c["check_only"] for c in proj.calls()] == [True]
  assert proj.result_files() == []


def test_dataset_folder_names_output_dir_and_is_resolved_from_caller_cwd(proj):
  data = proj.elsewhere / "corpora" / "mycorpus"
  data.mkdir(parents=True)
  (data / "train.txt").write_text("hello\n")
  _, _, train, log = proj.launched(["--dataset", "corpora/mycorpus/"], cwd=proj.elsewhere)
  args = train["args"]
  assert os.path.samefile(args[args.index("--dataset") + 1], data)
  assert args[args.index("--output_dir") + 1] == str(proj.root / "result" / "lm_mycorpus")
  assert log.startswith(str(proj.root / "result" / "lm_mycorpus" / "logs" / "train_"))


def test_output_dir_after_double_dash_is_used(proj):
  out = proj.tmp / "my run"
  stdout, _, train, log = proj.launched(["--dataset", "wikitext", "--", "--output_dir", str(out)])
  assert os.path.dirname(log) == str(out / "logs")
  assert LOG_NAME_RE.match(os.path.basename(log))
  assert os.path.isfile(log)
  args = train["args"]
  assert args[-4:] == ["--output_dir", str(out), "--log_file", log]
  assert proj.result_files() == []  # nothing under the default result/
  assert f"tensorboard --logdir {str(out / 'tensorboard').replace(' ', chr(92) + ' ')}" in stdout


def test_relative_output_dir_is_taken_from_caller_cwd(proj):
  _, _, train, log = proj.launched(["--", "--output_dir", "rel/out"], cwd=proj.elsewhere)
  assert log.startswith(str(proj.elsewhere / "rel" / "out" / "logs" / "train_"))
  assert os.path.isfile(log)


# ---------------------------------------------------------------------------------- resume

RESUME_SPELLINGS = [
    ["--resume"], ["-resume"], ["--resume=true"], ["--resume=T"], ["--resume=1"],
    ["--config.resume"], ["--config.resume=true"], ["--noresume", "--resume"],
    ["--checkpoint_file", "/snap/snapshot_5"], ["--checkpoint_file=/snap/snapshot_5"],
    ["--config.checkpoint_file=/snap/snapshot_5"], ["--config.checkpoint_file", "/snap/snapshot_5"],
]


NOT_RESUME_SPELLINGS = [["--noresume"], ["--resume=false"], ["--config.resume=0"],
                        ["--resume", "--noconfig.resume"], ["--checkpoint_file="]]


@pytest.mark.parametrize("spelling", RESUME_SPELLINGS + NOT_RESUME_SPELLINGS, ids=" ".join)
def test_resume_or_not_passes_only_what_was_typed(proj, spelling):
  # Issue 20 item 2: a resume got the launcher's lr 3e-4, batch 32, ... as if the user typed them,
  # and the trainer changed the run to them instead of taking the snapshot's. Issue 22: a new run
  # gets only what was typed as well.
  _, _, train, log = proj.launched(["--", *spelling, "--yes"])
  out = proj.root / "result" / "lm_wikitext-103"  # the default dataset names the default directory
  assert train["args"] == _expected_args(out, log, *spelling, "--yes")


def test_resume_passes_the_wrapper_options_that_were_typed(proj):
  _, _, train, log = proj.launched(
      ["--preset", "small", "--dataset", "wikitext", "--lr", "1e-3", "--monitor_interval", "50",
       "--", "--resume", "--yes"])
  assert train["args"] == _expected_args(
      proj.root / "result" / "lm_wikitext", log, "--model_preset", "small", "--dataset",
      "wikitext", "--lr", "1e-3", "--gradient_monitor", "--gradient_monitor_interval", "50",
      "--weight_monitor", "--weight_monitor_interval", "50", "--resume", "--yes")


def test_resume_checkpoint_path_is_taken_from_caller_cwd(proj):
  _, _, train, _ = proj.launched(["--", "--config.checkpoint_file=snaps/snapshot_5", "--yes"],
                                 cwd=proj.elsewhere)
  assert f"--config.checkpoint_file={proj.elsewhere}/snaps/snapshot_5" in train["args"]


def test_help_says_a_resume_gets_only_typed_options(tmp_path):
  r = _run(LAUNCHER, ["--help"], str(tmp_path), _clean_env())
  text = " ".join(r.stdout.split())
  assert "A resumed run gets only the options you typed, as a new one does" in text
  assert "Every default is the trainer's" in text
  assert ("--warmup 0 --snapshot 10000 --monitor_interval 10000 --sanity_check_interval 10000"
          in text.replace("\\ ", ""))  # the guide's launcher defaults, as options
  assert "watches the run for 5 s" in text


# ------------------------------------------------------------- environment and launching


def test_runs_from_any_cwd_and_logs_the_run(proj):
  stdout, check, train, log = proj.launched(["--preset", "tiny"], cwd=proj.elsewhere)
  for call in (check, train):
    assert call["cwd"] == str(proj.root)
    assert call["env"]["PYTHONPATH"].split(":")[0] == str(proj.root)
    assert call["env"].get("TIKTOKEN_CACHE_DIR") is None  # nothing ambient: gpt2 ships with gptjax
  out_dir = proj.root / "result" / "lm_wikitext"  # the tiny preset's dataset
  assert log.startswith(str(out_dir / "logs") + "/")
  # the stub ends at once: the launcher says so, not "started"
  assert stdout.startswith("Training finished within 5 s of starting (exit status 0).")
  assert f"tensorboard --logdir {out_dir}/tensorboard" in stdout
  # stdout and stderr of the background process both went to the log, after a header
  text = open(log).read()
  assert "step 1 | loss 10.0" in text
  assert "warning on stderr" in text
  assert "Final model saved to" in text
  assert sorted(os.listdir(out_dir / "logs")) == [os.path.basename(log)]


def test_a_running_run_is_reported_started_with_how_to_follow(proj):
  r = proj.run(["--preset", "tiny"], FAKE_SLEEP="60")
  pid = int(_printed(r.stdout, "PID"))
  try:
    assert r.returncode == 0, r.stderr
    assert not _ended(pid)  # still running after the launcher's 5 s watch
    log = _printed(r.stdout, "Log")
    assert r.stdout.startswith("Training started in the background.")
    assert f"tail -f {log}" in r.stdout
    assert f"ps -p {pid}" in r.stdout
    assert f"kill {pid}" in r.stdout
  finally:
    if not _ended(pid):
      os.kill(pid, signal.SIGTERM)


def test_a_run_that_dies_at_once_is_reported_exit_1(proj):
  # Issue 20 item 10: this run was reported as "Training started" and left to its log.
  out = proj.tmp / "out"
  r = proj.run(["--", "--resume", "--yes", "--output_dir", str(out)], FAKE_RUN_RC="2")
  assert r.returncode == 1, (r.stdout, r.stderr)
  assert r.stdout == ""
  lines = r.stderr.strip().splitlines()
  assert lines[0] == ("run_train_lm.sh: error: training exited with status 2 within 5 s of "
                      "starting; the log ends:")
  assert "    error: checkpoint_file: cannot restore snapshot_5 (ValueError)" in lines
  (log,) = glob.glob(str(out / "logs" / "train_*.log"))
  assert lines[-1] == f"  Log: {log}"
  assert "cannot restore snapshot_5" in open(log).read()  # the log is kept
  assert [c["check_only"] for c in proj.calls()] == [True, False]


def test_existing_tiktoken_cache_dir_is_kept(proj):
  _, check, train, _ = proj.launched([], TIKTOKEN_CACHE_DIR="/my/cache")
  assert train["env"]["TIKTOKEN_CACHE_DIR"] == "/my/cache"


def test_project_venv_python_is_preferred(proj):
  venv_python = proj.root / ".venv" / "bin" / "python"
  venv_python.parent.mkdir(parents=True)
  shutil.copy2(proj.stub, venv_python)
  env = proj.env()
  del env["PYTHON"]
  r = _run(proj.launcher, [], str(proj.elsewhere), env)
  assert r.returncode == 0, r.stderr
  assert _wait_pid(int(_printed(r.stdout, "PID")), 30)
  assert [c["check_only"] for c in proj.calls()] == [True, False]
  assert _printed(r.stdout, "Command").startswith(str(venv_python) + " -m gptjax.train")


def test_two_launches_in_one_second_get_two_logs(proj):
  out = proj.tmp / "out"
  logs = []
  for _ in range(2):
    r = proj.run(["--", "--output_dir", str(out)])
    assert r.returncode == 0, r.stderr
    assert _wait_pid(int(_printed(r.stdout, "PID")), 30)
    logs.append(_printed(r.stdout, "Log"))
  assert logs[0] != logs[1]
  assert all(os.path.isfile(l) for l in logs)


def test_two_launches_at_once_get_two_logs(proj):
  # Issue 20 item 4: two launches in one second chose their log name before either created it.
  out = proj.tmp / "out"
  launches = [subprocess.Popen([proj.launcher, "--", "--output_dir", str(out)],
                               cwd=str(proj.elsewhere), env=proj.env(), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True) for _ in range(3)]
  outputs = [p.communicate(timeout=60) for p in launches]
  assert [p.returncode for p in launches] == [0, 0, 0], outputs
  logs = [_printed(stdout, "Log") for stdout, _ in outputs]
  assert len(set(logs)) == 3
  for log in logs:  # each log holds one launch: one header, one run
    text = open(log).read()
    assert text.count("# run_train_lm.sh: started") == 1 and text.count("step 1 |") == 1, text
  train_logs = [c["args"][-1] for c in proj.calls() if not c["check_only"]]
  assert sorted(train_logs) == sorted(logs)


# ----------------------------------------------------------------- with the real trainer


@needs_trainer
@pytest.mark.parametrize("args", [
    ["--dataset", "/nonexistent/corpus"],
    ["--preset", "tiny", "--", "--d_model", "30", "--num_heads", "4"],
    ["--", "--no_such_flag"],
])
def test_real_check_only_rejects_before_launch(tmp_path, args):
  out = tmp_path / "out"
  r = _run(LAUNCHER, args + ([] if "--" in args else ["--"]) + ["--output_dir", str(out)],
           str(tmp_path), _clean_env(PYTHON=sys.executable), timeout=120)
  assert r.returncode == 2, (r.stdout, r.stderr)
  assert len(r.stderr.strip().splitlines()) == 1, r.stderr
  assert not out.exists()


@needs_trainer
def test_real_check_only_names_the_run_directory_last(tmp_path, monkeypatch, capsys):
  # What the launcher reads, here for the tiny preset, whose dataset (wikitext) names it.
  from gptjax import train
  monkeypatch.chdir(tmp_path)
  assert train.main(["train", "--model_preset", "tiny", "--check_only"]) == 0
  assert capsys.readouterr().out.splitlines()[-1] == (
      f"output_dir: {tmp_path / 'result' / 'lm_wikitext'}")
  assert os.listdir(tmp_path) == []  # a check writes nothing


@needs_trainer
def test_real_check_only_rejects_a_folder_without_test_txt(tmp_path):
  # Issue 20 item 10: the launcher said "Training started" and the run died in the background.
  folder = tmp_path / "corpus"
  folder.mkdir()
  for name in ("train.txt", "valid.txt"):
    (folder / name).write_text(" = A heading = \n Some text .\n")
  out = tmp_path / "out"
  r = _run(LAUNCHER, ["--dataset", str(folder), "--", "--output_dir", str(out)], str(tmp_path),
           _clean_env(PYTHON=sys.executable), timeout=120)
  assert r.returncode == 2, (r.stdout, r.stderr)
  assert r.stderr.strip().splitlines() == [
      f"run_train_lm.sh: error: dataset: folder {str(folder)!r} has no test files (test.txt|.jsonl"
      "|.parquet, test-*.EXT or test/); held_out_fraction > 0 holds valid and test out of train"]
  assert not out.exists()
  assert sorted(os.listdir(folder)) == ["train.txt", "valid.txt"]


@needs_trainer
def test_real_short_background_run(tmp_path, corpus, token_cache):
  out = tmp_path / "out"
  # A relative folder path, as dataset folders are in the guide's commands; the fixture's small
  # corpus keeps the three evaluations of the run short.
  dataset = os.path.relpath(corpus, REPO)
  r = _run(LAUNCHER,
           ["--preset", "tiny", "--dataset", dataset, "--epochs", "1", "--",
            "--max_samples", "60", "--d_model", "32", "--num_heads", "2", "--num_layers", "1",
            "--d_ff", "64", "--max_seq_len", "32", "--batch_size", "4", "--sample_prompts=",
            "--data_cache_dir", token_cache, "--output_dir", str(out)],
           REPO, _clean_env(PYTHON=sys.executable), timeout=120)
  assert r.returncode == 0, r.stderr
  pid = int(_printed(r.stdout, "PID"))
  log = _printed(r.stdout, "Log")
  try:
    finished = _wait_pid(pid, REAL_RUN_TIMEOUT_S)
  finally:
    if not _ended(pid):
      os.kill(pid, signal.SIGTERM)
  text = open(log).read() if os.path.isfile(log) else "<no log>"
  assert finished, f"training did not end within {REAL_RUN_TIMEOUT_S:.0f}s; log:\n{text[-3000:]}"
  assert os.path.dirname(log) == str(out / "logs")
  assert LOG_NAME_RE.match(os.path.basename(log))
  assert "Final model" in text, text[-3000:]
  assert os.listdir(out / "logs") == [os.path.basename(log)]  # one log, not two
