"""Where a run's words and numbers go: console, `logs/train_<TIMESTAMP>.log`, TensorBoard, tqdm.

Only process 0 reports. A progress bar is shown only when stdout is a terminal, so log files
hold plain timestamped lines.
"""
import datetime
import logging
import os
import sys

import jax
from tqdm import tqdm


def timestamp() -> str:
  """'2026FEB15_215234_GMT+00', the guide's log-file timestamp."""
  return datetime.datetime.now(datetime.timezone.utc).strftime("%Y%b%d_%H%M%S").upper() + "_GMT+00"


def format_duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  return f"{h}:{rem // 60:02d}:{rem % 60:02d}"


def _unused(stem: str) -> str:
  """`stem.log`, or `stem_1.log`, `stem_2.log`, ...: a run started in the same second as the
  previous one in this directory never appends to its log."""
  path, n = f"{stem}.log", 0
  while os.path.exists(path):
    n += 1
    path = f"{stem}_{n}.log"
  return path


class _TqdmHandler(logging.StreamHandler):
  """Console lines that do not tear a progress bar apart."""

  def emit(self, record):
    tqdm.write(self.format(record), file=sys.stdout)


class Reporter:
  def __init__(self, run_dir: str, log_file: str = "", stamp: str = ""):
    self.active = jax.process_index() == 0
    self.interactive = sys.stdout.isatty()
    self.stamp = stamp or timestamp()
    self.log_path = log_file or _unused(os.path.join(run_dir, "logs", f"train_{self.stamp}"))
    self.logger = logging.getLogger(f"gptjax.run.{id(self)}")
    self.logger.setLevel(logging.INFO)
    self.logger.propagate = False
    self.writer = None
    self.bar = None
    if not self.active:
      return
    fmt = logging.Formatter("%(asctime)s | %(message)s", "%Y-%m-%d %H:%M:%S")
    console = _TqdmHandler() if self.interactive else logging.StreamHandler(sys.stdout)
    handlers = [console]
    if not log_file:  # the launcher already sends stdout to `log_file`
      os.makedirs(os.path.dirname(self.log_path), exist_ok=True)
      handlers.append(logging.FileHandler(self.log_path))
    for h in handlers:
      h.setFormatter(fmt)
      self.logger.addHandler(h)
    from tensorboardX import SummaryWriter
    self.writer = SummaryWriter(os.path.join(run_dir, "tensorboard"))

  def info(self, msg: str) -> None:
    if self.active:
      self.logger.info(msg)

  def scalars(self, step: int, values: dict) -> None:
    if self.writer:
      for tag, value in values.items():
        self.writer.add_scalar(tag, value, step)

  def text(self, step: int, tag: str, text: str) -> None:
    if self.writer:
      self.writer.add_text(tag, text, step)

  def start_epoch(self, epoch: int, total: int, initial: int = 0) -> None:
    if self.active and self.interactive:
      self.bar = tqdm(total=total, initial=initial, desc=f"epoch {epoch}", unit="step",
                      dynamic_ncols=True, leave=False)

  def progress(self, n: int = 1, **postfix) -> None:
    if self.bar is not None:
      if postfix:  # given at log reads only, so drawing it at once costs little
        self.bar.set_postfix(postfix, refresh=True)
      self.bar.update(n)

  def end_epoch(self) -> None:
    if self.bar is not None:
      self.bar.close()
      self.bar = None

  def close(self) -> None:
    self.end_epoch()
    if self.writer:
      self.writer.close()
    for h in list(self.logger.handlers):
      h.close()
      self.logger.removeHandler(h)
