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

  def __init__(self, directory: str, keep: int):
    self.directory = os.path.abspath(directory)
    # cleanup_tmp_directories: what a killed process left half written goes at the next start.
    options = ocp.CheckpointManagerOptions(
        step_prefix=SNAPSHOT_PREFIX, enable_async_checkpointing=True,
        cleanup_tmp_directories=True, preservation_policy=checkpoint_managers.LatestN(keep))
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=("state", "meta"))

  def save(self, step: int, state, meta: dict) -> None:
    """Starts an async save; returns once the device-to-host copy is done."""
    meta = json.loads(json.dumps(meta))  # a copy: the JSON is written later, the caller goes on
    if step in self.manager.all_steps():  # e.g. a signal save and an epoch-end save of one step
      self.manager.wait_until_finished()
      self.manager.delete(step)
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def path(self, step: int) -> str:
    return snapshot_path(self.directory, step)

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    """Waits for the saves in flight, then releases the manager; a second call does nothing."""
    if self.manager is not None:
      self.manager.close()
      self.manager = None


def snapshot_path(directory: str, step: int) -> str:
  return os.path.join(directory, f"{SNAPSHOT_PREFIX}_{step}")


def complete_steps(directory: str) -> list[int]:
  """Steps of the complete snapshots in `directory`, read without a manager (which would write):
  a save cut short is still a temporary directory, and is not among them."""
  return sorted(s for s in ocp.utils.checkpoint_steps(directory)
                if os.path.isdir(snapshot_path(directory, s)))


def snapshot_step(path: str) -> tuple[str, int]:
  """('.../snapshots', 1200) from '.../snapshots/snapshot_1200'; ConfigError if it is not one."""
  path = os.path.abspath(path.rstrip("/"))
  name = os.path.basename(path)
  prefix = SNAPSHOT_PREFIX + "_"
  if not os.path.exists(path):
    raise ConfigError(f"checkpoint_file: {path} does not exist; give a snapshot directory such "
                      f"as result/lm_wikitext/snapshots/{prefix}1200")
  ok = (name.startswith(prefix) and name[len(prefix):].isdigit()
        and os.path.isdir(os.path.join(path, "state")) and os.path.isdir(os.path.join(path, "meta")))
  if not ok:
    raise ConfigError(f"checkpoint_file: {path} is not a gptjax snapshot (expected a "
                      f"'{prefix}<step>' directory holding state/ and meta/)")
  return os.path.dirname(path), int(name[len(prefix):])


def _restore_items(path: str, **items) -> dict:
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckpt:
    return ckpt.restore(path, ocp.args.Composite(**items))


def read_meta(path: str) -> dict:
  """The JSON item of a snapshot, read without restoring any arrays."""
  try:
    return dict(_restore_items(path, meta=ocp.args.JsonRestore())["meta"])
  except Exception as e:
    raise ConfigError(f"checkpoint_file: cannot read {path} ({type(e).__name__}: "
                      f"{str(e).splitlines()[0][:120] if str(e) else ''})") from None


def restore(path: str, target_state):
  """(state, meta) of the snapshot at `path`, restored onto the structure/sharding of
  `target_state`. Read without a manager: the run's own manager may be saving beside it."""
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target_state)
  try:
    out = _restore_items(path, state=ocp.args.StandardRestore(abstract),
                         meta=ocp.args.JsonRestore())
  except Exception as e:
    raise ConfigError(f"checkpoint_file: cannot restore {path} ({type(e).__name__}); it is "
                      "incomplete or from another model") from None
  return out["state"], dict(out["meta"])


def save_model(models_dir: str, name: str, params, info: dict) -> str:
  """Writes `models_dir/name/{params/, model.json}` atomically; returns the final path."""
  final = os.path.join(os.path.abspath(models_dir), name)
  tmp = os.path.join(os.path.abspath(models_dir), f".{name}.tmp")
  primary = jax.process_index() == 0
  if primary:
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
  # Every process writes its shards of `params` (Orbax's collective save); only process 0
  # prepares, describes and renames, with barriers so no process runs ahead of it.
  ocp.multihost.sync_global_processes("gptjax_save_model_start")
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(os.path.join(tmp, "params"), params)
    ckpt.wait_until_finished()
  if primary:
    with open(os.path.join(tmp, "model.json"), "w") as f:
      json.dump(info, f, indent=2)
    os.replace(tmp, final)
  ocp.multihost.sync_global_processes("gptjax_save_model_done")
  return final


def _restore_on_one_device(directory: str):
  """Arrays saved by any number of devices (sharded or not), restored whole on this process's
  first device: Orbax would otherwise look for the devices they were saved from."""
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  with ocp.StandardCheckpointer() as ckpt:
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                          ckpt.metadata(directory).item_metadata)
    return ckpt.restore(directory, target)


def load_params(path: str):
  """(params, info) from a final model directory or a snapshot directory."""
  path = os.path.abspath(path.rstrip("/"))
  if os.path.isfile(os.path.join(path, "model.json")):
    with open(os.path.join(path, "model.json")) as f:
      info = json.load(f)
    return _restore_on_one_device(os.path.join(path, "params")), info
  snapshot_step(path)  # raises a one-line error for anything else
  meta = read_meta(path)
  state = _restore_on_one_device(os.path.join(path, "state"))
  # The trainer saves {"train": TrainState} (plus "best" params with early_stop_restore_best).
  return state["train"]["params"], meta["model"]
