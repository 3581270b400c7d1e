"""Snapshots (one Orbax CheckpointManager: rotation, async saves, resume) and the final model.

A snapshot `snapshots/snapshot_<step>/` holds two items: `state` (parameters, optimizer state,
step; StandardSave) and `meta` (JSON: data position, early-stopping state, validation history,
the resolved config). Orbax writes each snapshot into a temporary directory and renames it when
complete, so a process killed mid-save never leaves one that `latest_step()` would pick.
The final model `models/model_<TIMESTAMP>/` is `params/` plus `model.json`, written to a hidden
temporary directory and renamed into place.
"""
import json
import os
import shutil

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from gptjax.config import ConfigError

SNAPSHOT_PREFIX = "snapshot"


class Snapshots:
  """Rotating snapshots of one run; a thin layer over `ocp.CheckpointManager`."""

  def __init__(self, directory: str, keep: int, read_only: bool = False):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
        step_prefix=SNAPSHOT_PREFIX, enable_async_checkpointing=True, read_only=read_only,
        create=not read_only, cleanup_tmp_directories=not read_only,
        preservation_policy=checkpoint_managers.LatestN(keep))
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=("state", "meta"))

  def save(self, step: int, state, meta: dict) -> None:
    """Starts an async save; returns once the device-to-host copy is done."""
    if step in self.manager.all_steps():  # e.g. a signal save and an epoch-end save of one step
      self.manager.wait_until_finished()
      self.manager.delete(step)
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)

  def steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def path(self, step: int) -> str:
    return os.path.join(self.directory, f"{SNAPSHOT_PREFIX}_{step}")

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()


def snapshot_step(path: str) -> tuple[str, int]:
  """('.../snapshots', 1200) from '.../snapshots/snapshot_1200'; ConfigError if it is not one."""
  path = os.path.abspath(path.rstrip("/"))
  name = os.path.basename(path)
  prefix = SNAPSHOT_PREFIX + "_"
  ok = (name.startswith(prefix) and name[len(prefix):].isdigit()
        and os.path.isdir(os.path.join(path, "state")) and os.path.isdir(os.path.join(path, "meta")))
  if not ok:
    raise ConfigError(f"checkpoint_file: {path} is not a gptjax snapshot (expected a "
                      f"'{prefix}<step>' directory holding state/ and meta/)")
  return os.path.dirname(path), int(name[len(prefix):])


def read_meta(snapshot_path: str) -> dict:
  """The JSON item of a snapshot, read without restoring any arrays."""
  try:
    ckpt = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
    return dict(ckpt.restore(snapshot_path, ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])
  except Exception as e:
    raise ConfigError(f"checkpoint_file: cannot read {snapshot_path} ({type(e).__name__}: "
                      f"{str(e).splitlines()[0][:120] if str(e) else ''})") from None


def restore(snapshots: Snapshots, step: int, target_state):
  """(state, meta) of snapshot `step`, restored onto the structure/sharding of `target_state`."""
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target_state)
  try:
    out = snapshots.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
  except Exception as e:
    raise ConfigError(f"checkpoint_file: cannot restore {snapshots.path(step)} "
                      f"({type(e).__name__}); it is incomplete or from another model") from None
  return out["state"], dict(out["meta"])


def save_model(models_dir: str, name: str, params, info: dict) -> str:
  """Writes `models_dir/name/{params/, model.json}` atomically; returns the final path."""
  final = os.path.join(os.path.abspath(models_dir), name)
  tmp = os.path.join(os.path.abspath(models_dir), f".{name}.tmp")
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(os.path.join(tmp, "params"), params)
    ckpt.wait_until_finished()
  with open(os.path.join(tmp, "model.json"), "w") as f:
    json.dump(info, f, indent=2)
  if jax.process_index() == 0:
    os.replace(tmp, final)
  return final


def load_params(path: str, info: dict | None = None):
  """(params, info) from a final model directory or a snapshot directory."""
  path = os.path.abspath(path.rstrip("/"))
  if os.path.isfile(os.path.join(path, "model.json")):
    with open(os.path.join(path, "model.json")) as f:
      info = json.load(f)
    with ocp.StandardCheckpointer() as ckpt:
      return ckpt.restore(os.path.join(path, "params")), info
  snapshot_step(path)  # raises a one-line error for anything else
  meta = read_meta(path)
  with ocp.StandardCheckpointer() as ckpt:
    state = ckpt.restore(os.path.join(path, "state"))
  return state["params"], meta["model"]
