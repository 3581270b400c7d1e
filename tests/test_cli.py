"""The command line of `python -m gptjax.train`: every guide option lands in the resolved config,
bad input is one line with exit code 2 and nothing on disk, --help/--info/--explain, the progress
bar on a terminal.

Parsing and validation are tested in-process (gptjax.cli.parse, trainer.check); a handful of
subprocesses of the real CLI check what a user sees: the exit code, one line on stderr, no
traceback, no run directory.
"""
import fcntl
import os
import pty
import re
import struct
import subprocess
import sys
import termios
import threading

import jax
import jax.numpy as jnp
import pytest

from gptjax import cli, config as config_lib, train, trainer
from gptjax.config import ConfigError
from gptjax.model import ModelConfig, count_params, padded_vocab_size
from conftest import REPO, read_run_log


def parse(*args):
  config, explicit, actions, _ = cli.parse(["train", *args])
  return config, explicit, actions


# ------------------------------------------------------------------- every guide option parses

GUIDE_OPTIONS = [  # (argv, field, value in the resolved config)
    (["--dataset", "wikitext"], "dataset", "wikitext"),
    (["--tokenizer", "gpt4"], "tokenizer", "gpt4"),
    (["--max_samples", "100"], "max_samples", 100),
    (["--model_preset", "small"], "model_preset", "small"),
    (["--model_preset=medium"], "d_model", 768),
    (["--epochs", "3"], "epochs", 3),
    (["--batch_size", "16"], "batch_size", 16),
    (["--lr", "6e-4"], "lr", 6e-4),
    (["--warmup_steps", "4000"], "warmup_steps", 4000),
    (["--weight_decay", "0.05"], "weight_decay", 0.05),
    (["--min_lr_ratio", "0.2"], "min_lr_ratio", 0.2),
    (["--gradient_clip", "0.5"], "gradient_clip", 0.5),
    (["--d_model", "128"], "d_model", 128),
    (["--num_heads", "8"], "num_heads", 8),
    (["--num_layers", "6"], "num_layers", 6),
    (["--d_ff", "2048"], "d_ff", 2048),
    (["--max_seq_len", "512"], "max_seq_len", 512),
    (["--dropout", "0.2"], "dropout", 0.2),
    (["--snapshot_interval", "5000"], "snapshot_interval", 5000),
    (["--keep_last_n_snapshots", "5"], "keep_last_n_snapshots", 5),
    (["--delete_snapshots_after_training"], "delete_snapshots_after_training", True),
    (["--no_delete_snapshots_after_training"], "delete_snapshots_after_training", False),
    (["--gradient_monitor"], "gradient_monitor", True),
    (["--gradient_monitor_interval", "500"], "gradient_monitor_interval", 500),
    (["--weight_monitor"], "weight_monitor", True),
    (["--noweight_monitor"], "weight_monitor", False),
    (["--weight_monitor_interval", "250"], "weight_monitor_interval", 250),
    (["--weight_monitor_sample_size", "512"], "weight_monitor_sample_size", 512),
    (["--sanity_check_interval", "1000"], "sanity_check_interval", 1000),
    (["--early_stopping"], "early_stopping", True),
    (["--early_stop_patience", "7"], "early_stop_patience", 7),
    (["--early_stop_min_delta", "0.01"], "early_stop_min_delta", 0.01),
    (["--no_early_stop_restore_best"], "early_stop_restore_best", False),
    (["--early_stop_overfit_patience", "3"], "early_stop_overfit_patience", 3),
    (["--early_stop_overfit_min_delta", "0.02"], "early_stop_overfit_min_delta", 0.02),
    (["--resume"], "resume", True),
    (["--checkpoint_file", "result/x/snapshots/snapshot_7"], "checkpoint_file",
     "result/x/snapshots/snapshot_7"),
    (["--yes"], "yes", True),
    (["-y"], "yes", True),
    (["--output_dir", "/tmp/somewhere"], "output_dir", "/tmp/somewhere"),
    (["--seed", "7"], "seed", 7),
    (["--remat"], "remat", True),                       # a field beyond the guide, as a flag
    (["--config.lr=2e-3"], "lr", 2e-3),
    (["--config", "configs/tiny.py"], "d_ff", 1024),
]


@pytest.mark.parametrize("argv,field,expected", GUIDE_OPTIONS,
                         ids=[" ".join(a) for a, _, _ in GUIDE_OPTIONS])
def test_guide_option_lands_in_config(argv, field, expected):
  config, explicit, _ = parse(*argv)
  assert config[field] == expected
  assert field in explicit
  config_lib.validate(config)


def test_every_guide_option_is_in_the_table():
  """The option list of the issue (the guide's train_lm.py options) is covered above."""
  guide_flags = ["--dataset", "--tokenizer", "--max_samples", "--model_preset", "--epochs",
                 "--batch_size", "--lr", "--warmup_steps", "--weight_decay", "--min_lr_ratio",
                 "--gradient_clip", "--d_model", "--num_heads", "--num_layers", "--d_ff",
                 "--max_seq_len", "--dropout", "--snapshot_interval", "--keep_last_n_snapshots",
                 "--delete_snapshots_after_training", "--no_delete_snapshots_after_training",
                 "--gradient_monitor", "--gradient_monitor_interval", "--weight_monitor",
                 "--weight_monitor_interval", "--weight_monitor_sample_size",
                 "--sanity_check_interval", "--early_stopping", "--early_stop_patience",
                 "--early_stop_min_delta", "--no_early_stop_restore_best",
                 "--early_stop_overfit_patience", "--early_stop_overfit_min_delta", "--resume",
                 "--checkpoint_file", "--yes", "-y", "--output_dir"]
  tested = {a.split("=")[0] for argv, _, _ in GUIDE_OPTIONS for a in argv if a.startswith("-")}
  assert set(guide_flags) <= tested, set(guide_flags) - tested


def test_actions_and_preset_values():
  _, _, actions = parse("--info")
  assert actions == {"info"}
  _, _, actions = parse("--explain")
  assert actions == {"explain"}
  config, explicit, _ = parse("--model_preset", "tiny", "--d_model", "64")
  assert (config.d_model, config.num_layers, config.d_ff, config.max_seq_len,
          config.dataset) == (64, 4, 1024, 256, "wikitext")
  assert {"d_model", "num_layers", "model_preset"} <= explicit


def test_guide_session_3_and_advanced_usage_commands():
  """The guide's two long train_lm.py command lines, with python -m gptjax.train in front."""
  config, _, _ = parse(
      "--model_preset", "medium", "--dataset", "wikitext-103", "--epochs", "40",
      "--batch_size", "16", "--lr", "3e-4", "--warmup_steps", "4000", "--gradient_clip", "1.0",
      "--snapshot_interval", "2000", "--gradient_monitor", "--gradient_monitor_interval", "500",
      "--early_stopping", "--early_stop_patience", "7", "--early_stop_overfit_patience", "3",
      "--weight_monitor", "--weight_monitor_interval", "100", "--keep_last_n_snapshots", "5",
      "--yes")
  config_lib.validate(config)
  assert (config.d_model, config.epochs, config.batch_size, config.snapshot_interval,
          config.early_stop_overfit_patience, config.keep_last_n_snapshots, config.yes) == \
      (768, 40, 16, 2000, 3, 5, True)
  config, _, _ = parse(
      "--dataset", "wikitext-103", "--model_preset", "small", "--epochs", "30",
      "--batch_size", "32", "--lr", "6e-4", "--warmup_steps", "4000", "--gradient_clip", "1.0",
      "--weight_decay", "0.1", "--snapshot_interval", "5000", "--gradient_monitor",
      "--gradient_monitor_interval", "1000", "--early_stopping", "--early_stop_patience", "5",
      "--weight_monitor", "--weight_monitor_interval", "100")
  config_lib.validate(config)
  assert (config.d_model, config.lr, config.warmup_steps, config.gradient_monitor_interval) == \
      (512, 6e-4, 4000, 1000)


def test_launcher_command_line_parses():
  """What run_train_lm.sh builds: its defaults, then the flags after `--` (the last wins)."""
  config, _, _ = parse(
      "--model_preset", "tiny", "--dataset", "wikitext", "--epochs", "20", "--batch_size", "32",
      "--lr", "3e-4", "--warmup_steps", "0", "--snapshot_interval", "10000",
      "--gradient_monitor", "--gradient_monitor_interval", "10000", "--weight_monitor",
      "--weight_monitor_interval", "10000", "--sanity_check_interval", "10000",
      "--batch_size", "4", "--output_dir", "out", "--output_dir", "out")
  assert (config.batch_size, config.warmup_steps, config.gradient_monitor) == (4, 0, True)


def test_two_values_for_one_field_name_both():
  for argv in (["--lr", "1e-3", "--config.lr=2e-3"], ["--config.lr=2e-3", "--lr", "1e-3"]):
    with pytest.raises(ConfigError) as e:
      parse(*argv)
    assert str(e.value).startswith("lr: ") and "--lr" in str(e.value) \
        and "--config.lr" in str(e.value), str(e.value)
  assert parse("--lr", "2e-3", "--config.lr=2e-3")[0].lr == 2e-3  # the same value twice is fine
  with pytest.raises(ConfigError, match=r"^model_preset: .*'tiny'.*'small'"):
    parse("--model_preset", "tiny", "--config", "configs/small.py")


# ------------------------------------------------------------------------------- bad input

def bad_inputs(tmp_path):
  no_train = tmp_path / "no_train_txt"
  no_train.mkdir(exist_ok=True)
  (no_train / "valid.txt").write_text("hello\n")
  return [  # (argv, field, text the message must hold)
      (["--model_preset", "huge"], "model_preset", "'huge'"),
      (["--dataset", "nowhere"], "dataset", "'nowhere'"),
      (["--tokenizer", "gpt5"], "tokenizer", "'gpt5'"),
      (["--epochs", "0"], "epochs", "0"),
      (["--epochs", "-2"], "epochs", "-2"),
      (["--batch_size", "0"], "batch_size", "0"),
      (["--d_model", "0"], "d_model", "0"),
      (["--num_heads", "-1"], "num_heads", "-1"),
      (["--num_layers", "0"], "num_layers", "0"),
      (["--d_ff", "0"], "d_ff", "0"),
      (["--max_seq_len", "0"], "max_seq_len", "0"),
      (["--d_model", "30", "--num_heads", "4"], "d_model", "divisible by num_heads"),
      (["--dropout", "1"], "dropout", "1.0"),
      (["--dropout", "-0.1"], "dropout", "-0.1"),
      (["--lr", "-1e-3"], "lr", "-0.001"),
      (["--weight_decay", "-0.1"], "weight_decay", "-0.1"),
      (["--min_lr_ratio", "1.5"], "min_lr_ratio", "1.5"),
      (["--min_lr_ratio", "-0.5"], "min_lr_ratio", "-0.5"),
      (["--dataset", str(no_train)], "dataset", "train.txt"),
      (["--checkpoint_file", str(tmp_path / "nope")], "checkpoint_file", "does not exist"),
      (["--resume"], "resume", "no snapshot"),
      (["--bogus", "1"], "bogus", "unknown option"),
      (["--epochz", "3"], "epochz", "did you mean --epochs"),
      (["--epochs", "abc"], "epochs", "'abc'"),
      (["--lr", "fast"], "lr", "'fast'"),
      (["--epochs"], "epochs", "needs a value"),
      (["--config.bogus=1"], "bogus", "unknown config field"),
      (["--config", str(tmp_path / "missing.py")], "config", "missing.py"),
      (["--lr", "1e-3", "--config.lr=2e-3"], "lr", "--config.lr=2e-3"),
  ]


def test_bad_input_is_one_line_naming_field_and_value(tmp_path):
  out = tmp_path / "run"
  for argv, field, needle in bad_inputs(tmp_path):
    with pytest.raises(ConfigError) as e:
      config, explicit, _ = parse("--output_dir", str(out), *argv)
      trainer.check(config, explicit)
    message = str(e.value)
    assert message.startswith(f"{field}: ") and needle in message, (argv, message)
    assert "\n" not in message and len(message) < 240, (argv, message)
  assert not out.exists()


def test_data_dependent_errors_write_nothing(tiny_config, tmp_path):
  """Errors found once the tokens are loaded come before the run directory is made."""
  for field, value, needle in (("max_seq_len", 4000, "longer than the tokenized"),
                               ("batch_size", 4000, "training tokens")):
    config = tiny_config.copy_and_resolve_references()
    config[field] = value
    with pytest.raises(ConfigError, match=rf"^{field}: {value} .*{needle}"):
      trainer.train_and_evaluate(config)
    assert not os.path.exists(config.output_dir)


def _cli(args, cwd=REPO):
  env = dict(os.environ, PYTHONPATH=REPO)
  return subprocess.Popen([sys.executable, "-m", "gptjax.train", *args], cwd=cwd, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_real_cli_bad_input_exit_2_no_traceback_nothing_written(tmp_path, corpus, token_cache):
  """A few cases through the real CLI, run side by side: exit 2, one `error: FIELD: ...` line."""
  out = tmp_path / "run"
  cases = {
      "preset": (["--model_preset", "huge"], "model_preset"),
      "type": (["--epochs", "abc"], "epochs"),
      "flag": (["--no_such_flag"], "no_such_flag"),
      "conflict": (["--lr", "1e-3", "--config.lr=2e-3"], "lr"),
      "heads": (["--d_model", "30", "--num_heads", "4"], "d_model"),
      "folder": (["--dataset", str(tmp_path)], "dataset"),
      "resume": (["--resume"], "resume"),
      "checkpoint": (["--checkpoint_file", str(tmp_path / "snapshot_9")], "checkpoint_file"),
      "context": (["--dataset", corpus, "--data_cache_dir", token_cache, "--max_seq_len", "4000"],
                  "max_seq_len"),
  }
  procs = {name: _cli(argv + ["--output_dir", str(out)]) for name, (argv, _) in cases.items()}
  for name, proc in procs.items():
    stdout, stderr = proc.communicate(timeout=300)
    field = cases[name][1]
    assert proc.returncode == 2, (name, stdout, stderr)
    assert "Traceback" not in stderr + stdout, (name, stderr)
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {field}: "), (name, stderr)
  assert not out.exists()


def test_out_of_memory_is_recognised_wherever_it_surfaces():
  """A real RESOURCE_EXHAUSTED from XLA (an 8 TiB buffer), bare and wrapped by another error."""
  with pytest.raises(Exception) as e:
    jax.jit(lambda: jnp.zeros((2 ** 41,), jnp.float32))().block_until_ready()
  assert train.out_of_memory(e.value)
  try:
    try:
      raise e.value
    except Exception as inner:
      raise RuntimeError("a save failed") from inner
  except RuntimeError as wrapped:
    assert train.out_of_memory(wrapped)
  assert not train.out_of_memory(ValueError("d_model must be positive"))


# ------------------------------------------------------------------- --help, --info, --explain

def test_help_info_explain(tmp_path):
  env = dict(os.environ, PYTHONPATH=REPO, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
             TIKTOKEN_CACHE_DIR=str(tmp_path / "empty"))  # nothing to download from
  runs = {flag: subprocess.Popen([sys.executable, "-m", "gptjax.train", flag], cwd=tmp_path,
                                 env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True) for flag in ("--help", "--info", "--explain")}
  out = {}
  for flag, proc in runs.items():
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, (flag, stderr)
    out[flag] = stdout
  assert not os.listdir(tmp_path)

  # --help: every option, with its default on its entry
  entries = re.split(r"\n(?=  -)", out["--help"])
  for name in cli.ALIASES:
    flag = "-y, --yes" if name == "yes" else f"--{name}"
    (entry,) = [e for e in entries if e.startswith(f"  {flag} ") or e.startswith(f"  {flag}\n")]
    assert f"(default: {config_lib.FIELDS[name][0]!r})" in " ".join(entry.split()), entry
  for flag in ["--config FILE", "--model_preset", "--info", "--explain", "--check_only",
               "-h, --help", "--log_file"] + [f"--{n}" for n in cli.NEGATIONS]:
    assert any(e.startswith(f"  {flag}") for e in entries), flag

  # --info: the presets table, counted from the configs
  info = out["--info"]
  for preset in config_lib.PRESETS:
    config, _, _ = parse("--model_preset", preset)
    n = count_params(ModelConfig(
        vocab_size=padded_vocab_size(config_lib.TOKENIZER_VOCAB[config.tokenizer]),
        d_model=config.d_model, num_heads=config.num_heads, num_layers=config.num_layers,
        d_ff=config.d_ff, max_seq_len=config.max_seq_len))
    (row,) = [l for l in info.splitlines() if l.startswith(f"| {preset} ")]
    assert f"{n:,}" in row and f"| {config.d_model:>7} |" in row, row
  assert 15e6 < int(re.search(r"\| tiny +\| +([\d,]+)", info).group(1).replace(",", "")) < 17e6
  for needle in ("pre-LN", "tied", "bfloat16", "MONITORS", "2 or more dimensions", "warmup",
                 "--resume", "snapshot_<step>", "tensorboard", "TIKTOKEN_CACHE_DIR"):
    assert needle in info, needle
  assert "python -m gptjax.train --model_preset tiny" in out["--explain"]
  assert "--resume" in out["--explain"] and "run_train_lm.sh" in out["--explain"]


def test_explain_examples_parse():
  """Every `python -m gptjax.train ...` line of --explain is a valid command line."""
  from gptjax import docs
  text = docs.explain().replace("\\\n", " ")
  commands = re.findall(r"^\s+python -m gptjax\.train (.*)$", text, re.M)
  assert len(commands) >= 8
  for command in commands:
    if command.strip() == "--help":
      continue
    config, _, _ = parse(*command.split())
    if not (config.resume or config.checkpoint_file or "path/to" in config.dataset):
      config_lib.validate(config)


# ----------------------------------------------------------------------- the terminal niceties

def test_progress_bar_on_a_terminal_plain_lines_in_the_log(tiny_config, monkeypatch):
  """stdout and stderr on a real pseudo-terminal: a bar with loss, lr and tok/s on the screen;
  the log file holds only timestamped lines. A warmup longer than the run is a warning."""
  config = tiny_config
  config.update(epochs=1, max_samples=40, log_interval=2, warmup_steps=10_000,
                weight_monitor=False)
  master, slave = pty.openpty()
  fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 200, 0, 0))  # 200 columns
  screen = []
  reader = threading.Thread(target=lambda: _drain(master, screen), daemon=True)
  reader.start()
  terminal = os.fdopen(slave, "w", buffering=1)
  monkeypatch.setattr(sys, "stdout", terminal)
  monkeypatch.setattr(sys, "stderr", terminal)
  try:
    trainer.train_and_evaluate(config)
  finally:
    monkeypatch.undo()
    terminal.close()
    reader.join(timeout=10)
  shown = b"".join(screen).decode(errors="replace")
  assert re.search(r"epoch 1: .*loss=\d+\.\d+, lr=[\d.e+-]+, tok/s=[\d,]+", shown), shown[-2000:]
  for split in ("valid", "test"):  # evaluation has its bar too
    assert re.search(rf"eval {split}: .*\d+/\d+ \[", shown), shown[-2000:]
  log = read_run_log(config.output_dir)
  assert "\r" not in log and "it/s" not in log and "loss=" not in log
  stamp = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \| ")
  assert all(stamp.match(line) or line.startswith("  ") for line in log.splitlines()), log
  assert re.search(r"Warning: warmup_steps 10000 is longer than the whole run", log)


def _drain(fd, chunks):
  while True:
    try:
      data = os.read(fd, 4096)
    except OSError:  # the terminal was closed
      return
    if not data:
      return
    chunks.append(data)
