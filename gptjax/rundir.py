"""One writer per run directory: an OS lock on `<run_dir>/.lock`.

The lock is `flock` on an open file, so the OS releases it when the process ends in any way
(kill -9 included): there is never a stale lock to clear by hand. The file holds the owner's PID
and host, which the refusal names. Only process 0 of a multi-process run takes it.
"""
import fcntl
import os
import socket

from gptjax.config import ConfigError

LOCK_NAME = ".lock"


def _owner(path: str) -> str:
  try:
    with open(path) as f:
      return f.read().strip() or "unknown"
  except OSError:
    return "unknown"


def _refuse(run_dir: str, path: str):
  raise ConfigError(f"output_dir: {run_dir} is in use by another gptjax run ({_owner(path)}); "
                    "wait for it to end (or stop it), or give another --output_dir")


class RunLock:
  """Holds the run directory's lock until `release` (or the process's end)."""

  def __init__(self, run_dir: str):
    os.makedirs(run_dir, exist_ok=True)
    self.path = os.path.join(run_dir, LOCK_NAME)
    self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      os.close(self.fd)
      _refuse(run_dir, self.path)
    os.ftruncate(self.fd, 0)
    os.write(self.fd, f"PID {os.getpid()} on {socket.gethostname()}\n".encode())

  def release(self) -> None:
    if self.fd is not None:
      os.close(self.fd)  # closing the descriptor releases the flock
      self.fd = None


def check_free(run_dir: str) -> None:
  """ConfigError if a running process holds `run_dir`'s lock; writes nothing."""
  path = os.path.join(run_dir, LOCK_NAME)
  try:
    fd = os.open(path, os.O_RDONLY)
  except OSError:
    return
  try:
    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
  except BlockingIOError:
    _refuse(run_dir, path)
  finally:
    os.close(fd)
