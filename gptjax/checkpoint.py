"""Snapshots (one Orbax CheckpointManager: rotation, async saves, resume) and the final model.

A snapshot `snapshots/snapshot_<step>/` holds two items: `state` (parameters, optimizer state,
step; StandardSave) and `meta` (JSON: data position, early-stopping state, validation history,
the resolved config). Orbax writes each snapshot into a temporary directory and renames it when
complete, so a process killed mid-save never leaves one that `latest_step()` would pick.
The final model `models/model_<TIMESTAMP>/` is `params/` plus `model.json`, written to a hidden
temporary directory and renamed into place.

Both carry `manifest.json`: the size and SHA-256 of every file, written once the save is complete
and before the directory gets its final name (a snapshot's from Orbax's post-finalization hook).
A snapshot without one is incomplete; a file that no longer matches it is damaged. Both are found
before anything is restored (`verify`), so a flipped byte or a truncated file is an error naming
the directory, never a run that trains on garbage.
"""
import dataclasses
import glob
import hashlib
import json
import os
import shutil
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from gptjax import plan as plan_lib
from gptjax.config import ConfigError
from gptjax.model import ModelConfig

SNAPSHOT_PREFIX = "snapshot"
MANIFEST = "manifest.json"
_TMP_SUFFIX = ".orbax-checkpoint-tmp"  # Orbax's name for a step directory still being written
# Orbax rewrites the step's metadata (its commit time) as it renames the directory, after the
# manifest: not covered (the arrays and the meta item are).
_STEP_METADATA = "_CHECKPOINT_METADATA"


class DamagedError(ConfigError):
  """A snapshot or model directory whose files do not match its manifest (or that has none)."""


def _sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    while chunk := f.read(1 << 22):
      digest.update(chunk)
  return digest.hexdigest()


def _files(directory: str):
  for root, _, names in os.walk(directory):
    for name in names:
      rel = os.path.relpath(os.path.join(root, name), directory)
      if rel not in (MANIFEST, _STEP_METADATA):
        yield rel


def write_manifest(directory: str) -> None:
  """Records the size and SHA-256 of every file under `directory` in its manifest.json."""
  files = {rel: {"size": os.path.getsize(os.path.join(directory, rel)),
                 "sha256": _sha256(os.path.join(directory, rel))}
           for rel in sorted(_files(directory))}
  tmp = os.path.join(directory, MANIFEST + ".tmp")
  with open(tmp, "w") as f:
    json.dump({"files": files}, f, indent=1)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, os.path.join(directory, MANIFEST))


def verify(directory: str) -> None:
  """Raises DamagedError naming `directory` and the first file that differs from its manifest."""
  try:
    with open(os.path.join(directory, MANIFEST)) as f:
      files = json.load(f)["files"]
  except FileNotFoundError:
    raise DamagedError(f"{directory} has no {MANIFEST}: not a complete gptjax save (one cut "
                       "short, or another program's)") from None
  except (ValueError, KeyError, TypeError) as e:
    raise DamagedError(f"{directory}: its {MANIFEST} is damaged ({type(e).__name__})") from None
  for rel, want in files.items():
    path = os.path.join(directory, rel)
    if not os.path.isfile(path):
      raise DamagedError(f"{directory} is damaged: {rel} is missing")
    size = os.path.getsize(path)
    if size != want["size"]:
      raise DamagedError(f"{directory} is damaged: {rel} has {size:,} bytes, "
                         f"{want['size']:,} were written")
    if _sha256(path) != want["sha256"]:
      raise DamagedError(f"{directory} is damaged: {rel} differs from what was written "
                         "(checksum mismatch)")


class Snapshots:
  """Rotating snapshots of one run; a thin layer over `ocp.CheckpointManager`."""

  def __init__(self, directory: str, keep: int):
    self.directory = os.path.abspath(directory)
    # cleanup_tmp_directories: what a killed process left half written goes at the next start.
    self._saving = None  # the step whose save is in flight
    options = ocp.CheckpointManagerOptions(
        step_prefix=SNAPSHOT_PREFIX, enable_async_checkpointing=True,
        cleanup_tmp_directories=True, preservation_policy=checkpoint_managers.LatestN(keep),
        async_options=ocp.AsyncOptions(post_finalization_callback=self._write_manifest))
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=("state", "meta"))

  def save(self, step: int, state, meta: dict) -> None:
    """Starts an async save; returns once the device-to-host copy is done."""
    meta = json.loads(json.dumps(meta))  # a copy: the JSON is written later, the caller goes on
    if step in self.manager.all_steps():  # e.g. a signal save and an epoch-end save of one step
      self.manager.wait_until_finished()
      self.manager.delete(step)
    self.manager.wait_until_finished()  # as Orbax would: one save in flight, named below
    self._saving = step
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)

  def _write_manifest(self) -> None:
    """Orbax calls this once every file of the save in flight is written, before it renames the
    temporary directory: a snapshot gets its final name with its manifest, or not at all."""
    if jax.process_index() != 0:
      return
    tmp = glob.glob(glob.escape(self.path(self._saving)) + _TMP_SUFFIX + "*")
    # Where Orbax writes in place (no temporary directory), the step's own directory.
    write_manifest(tmp[0] if len(tmp) == 1 else self.path(self._saving))

  def check(self) -> None:
    """Raises the error of a save that failed in the background (e.g. the disk is full), so the
    run stops at once instead of training on until its next save. Cheap: it waits for nothing."""
    if not self.manager.is_saving_in_progress():
      self.manager.wait_until_finished()  # returns at once; raises what a finished save raised

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


def all_steps(directory: str) -> list[int]:
  """Steps of every `snapshot_<step>` directory in `directory`, complete or not."""
  return sorted(s for s in ocp.utils.checkpoint_steps(directory)
                if os.path.isdir(snapshot_path(directory, s)))


def complete_steps(directory: str) -> list[int]:
  """Steps of the complete snapshots in `directory`, read without a manager (which would write):
  a save cut short is still a temporary directory or has no manifest, and is not among them."""
  return [s for s in all_steps(directory)
          if os.path.isfile(os.path.join(snapshot_path(directory, s), MANIFEST))]


def move_aside(directory: str, after_step: int) -> str | None:
  """Moves every snapshot of `directory` later than `after_step` (complete or not) into
  `<directory>_set_aside_<TIME>/`, where rotation never deletes them; returns that folder."""
  later = [s for s in all_steps(directory) if s > after_step]
  if not later:
    return None
  aside = f"{directory}_set_aside_{time.strftime('%Y%m%d_%H%M%S')}"
  os.makedirs(aside, exist_ok=True)
  for s in later:
    os.replace(snapshot_path(directory, s), snapshot_path(aside, s))
  return aside


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


def check_snapshot(path: str) -> None:
  """ConfigError naming the snapshot at `path` if it is incomplete or damaged, and what to do."""
  try:
    verify(path)
  except DamagedError as e:
    directory, step = os.path.dirname(path), int(os.path.basename(path).rpartition("_")[2])
    older = [s for s in complete_steps(directory) if s < step]
    hint = (f"resume from the older snapshot with --checkpoint_file "
            f"{snapshot_path(directory, older[-1])} (later ones are moved aside, not deleted)"
            if older else "no older complete snapshot is left; start the run again")
    raise ConfigError(f"checkpoint_file: {e}; {hint}") from None


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
  if primary:  # a save cut short (the run holds the directory's lock: no other is writing)
    for stale in glob.glob(os.path.join(glob.escape(os.path.abspath(models_dir)), ".*.tmp")):
      shutil.rmtree(stale, ignore_errors=True)
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
    write_manifest(tmp)
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


def nonfinite_leaves(tree) -> list[str]:
  """Paths of the leaves of `tree` holding a NaN or an infinity."""
  return [jax.tree_util.keystr(p) for p, leaf in jax.tree_util.tree_leaves_with_path(tree)
          if np.issubdtype(np.asarray(leaf).dtype, np.floating)
          and not bool(jax.numpy.isfinite(leaf).all())]


def load_params(path: str):
  """(params, info) from a final model directory or a snapshot directory, checked against its
  manifest; info holds the architecture and the run's config."""
  path = os.path.abspath(path.rstrip("/"))
  if os.path.isfile(os.path.join(path, "model.json")):
    if os.path.isfile(os.path.join(path, MANIFEST)):
      verify(path)
    else:  # written by a gptjax before manifests
      print(f"warning: {path} has no {MANIFEST}; its files cannot be checked", file=sys.stderr)
    with open(os.path.join(path, "model.json")) as f:
      info = json.load(f)
    params = _restore_on_one_device(os.path.join(path, "params"))
  else:
    snapshot_step(path)  # raises a one-line error for anything else
    verify(path)
    meta = read_meta(path)
    state = _restore_on_one_device(os.path.join(path, "state"))
    # The trainer saves {"train": TrainState} (plus "best" params with early_stop_restore_best).
    params, info = state["train"]["params"], dict(meta["model"], config=meta["config"])
  bad = nonfinite_leaves(params)
  if bad:
    raise DamagedError(f"{path} holds non-finite weights (in {', '.join(bad[:3])}); it is "
                       "damaged")
  return params, info


def is_model_dir(path: str) -> bool:
  if os.path.isfile(os.path.join(path, "model.json")):
    return True
  try:
    snapshot_step(path)
    return True
  except ConfigError:
    return False


def model_config_from_info(info: dict) -> ModelConfig:
  """The ModelConfig recorded in model.json (or a snapshot), for inference on this machine."""
  names = {f.name for f in dataclasses.fields(ModelConfig)}
  arch = {k: v for k, v in info["model"].items() if k in names}
  # The dtype is kept (a bfloat16-trained model is measured in it); how it computes is this
  # machine's default plan.
  local = plan_lib.for_inference(jnp.dtype(arch["dtype"]).name, jax.default_backend())
  return ModelConfig(**dict(arch, **plan_lib.model_fields(local), remat=False))


def load_model(path: str):
  """(ModelConfig, params on the local device, info) of a final model or snapshot directory,
  each failure a ConfigError naming `path`."""
  if not path:
    raise ConfigError("model: no model given; pass --model PATH (a models/model_<TIMESTAMP>/ or "
                      "snapshots/snapshot_<step>/ directory)")
  if not os.path.isdir(path):
    raise ConfigError(f"model: {path!r} does not exist or is not a directory")
  if not is_model_dir(path):
    raise ConfigError(f"model: {path!r} is not a gptjax model; expected a final model directory "
                      "(models/model_<TIMESTAMP>/ with model.json and params/) or a snapshot "
                      "(snapshots/snapshot_<step>/)")
  try:
    params, info = load_params(path)
  except DamagedError as e:
    raise ConfigError(f"model: {e}") from None
  except ConfigError:
    raise
  except Exception as e:
    raise ConfigError(f"model: cannot read {path!r} ({type(e).__name__}); it is incomplete or "
                      "damaged") from None
  return model_config_from_info(info), params, info
