"""Where arrays live: the device mesh, parameter/optimizer/batch shardings, multi-process start-up.

One SPMD program runs over a `jax.sharding.Mesh` of every device of every process, with two axes:
`data` (pure data parallelism: parameters replicated) and `fsdp` (fully-sharded data parallelism:
each large weight, and its optimizer moments, split over the axis, as nanodo's `fsdp.py` does).
A batch is split over both axes together, so every device gets `batch_size / device_count` rows.
XLA inserts the collectives (all-gather of weights, reduce-scatter/all-reduce of gradients), so
the step function is the same code on one device and on many, and its reductions (loss, norms,
non-finite counts) are global. Several processes (one per machine, usually) join through
`jax.distributed.initialize`; each feeds only its rows of every global batch.
"""
import os

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from gptjax.config import ConfigError, validate

MESH_AXES = ("data", "fsdp")
BATCH_SPEC = P(MESH_AXES)   # the batch axis split over every device

def _launcher_process_count() -> int:
  """Processes started by Slurm (srun) or Open MPI (mpirun), the launchers JAX detects; else 1."""
  if "SLURM_PROCID" in os.environ:
    return int(os.environ.get("SLURM_STEP_NUM_TASKS", os.environ.get("SLURM_NTASKS", "1")))
  return int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1"))


def initialize_distributed(config) -> bool:
  """Joins the processes of a multi-process run through `jax.distributed.initialize`.

  Explicit `coordinator_address` / `num_processes` / `process_id` win; the ones left unset are
  filled in by JAX's own cluster detection (Slurm, Open MPI, ...). A run with one process does
  nothing. Must run before anything touches a JAX device. Returns True if it initialized.
  """
  explicit = {"coordinator_address": config.coordinator_address or None,
              "num_processes": config.num_processes or None,
              "process_id": None if config.process_id < 0 else config.process_id}
  if explicit["num_processes"] == 1 or (
      not any(v is not None for v in explicit.values()) and _launcher_process_count() < 2):
    return False
  validate(config)  # a bad process_id fails here, not as a coordinator that waits for it
  try:
    jax.distributed.initialize(**explicit)
  except (ValueError, RuntimeError) as e:
    given = ", ".join(f"{k}={v!r}" for k, v in explicit.items() if v is not None) or "none given"
    raise ConfigError(
        f"coordinator_address: cannot start the multi-process run ({given}): "
        f"{str(e).splitlines()[0][:200]}; pass --config.coordinator_address=HOST:PORT, "
        "--config.num_processes=N and --config.process_id=I (0 on HOST) to every process") from None
  return True


def _fill(field: str, n_devices: int, other_field: str, other: int) -> int:
  if n_devices % other:
    raise ConfigError(f"{field}: -1 cannot fill {n_devices} devices beside {other_field}={other}; "
                      f"use a divisor of {n_devices}")
  return n_devices // other


def mesh_shape(config, n_devices: int) -> tuple[int, int]:
  """(data, fsdp) from the config; -1 fills the rest (fsdp fills when both are -1)."""
  data, fsdp = config.mesh_data, config.mesh_fsdp
  if fsdp == -1:
    data = 1 if data == -1 else data
    fsdp = _fill("mesh_fsdp", n_devices, "mesh_data", data)
  elif data == -1:
    data = _fill("mesh_data", n_devices, "mesh_fsdp", fsdp)
  if data * fsdp != n_devices:
    raise ConfigError(f"mesh_data: mesh_data={data} x mesh_fsdp={fsdp} = {data * fsdp} devices, "
                      f"but {n_devices} are available; their product must equal it (-1 fills)")
  return data, fsdp


def make_mesh(config, devices=None) -> Mesh:
  """The ('data', 'fsdp') mesh over `devices` (default: every device of every process)."""
  devices = jax.devices() if devices is None else list(devices)
  shape = mesh_shape(config, len(devices))
  # Auto axes: XLA propagates shardings through the model code, which names none itself.
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


def check_batch_size(batch_size: int, mesh: Mesh, field: str = "batch_size") -> None:
  """Every device gets the same whole number of rows and every process its own equal share."""
  n_devices, n_processes = mesh.devices.size, jax.process_count()
  if batch_size % n_devices or batch_size % n_processes:
    raise ConfigError(
        f"{field}: {batch_size} sequences cannot be split evenly over {n_devices} devices "
        f"({n_processes} process{'es' if n_processes > 1 else ''}): the per-device batch would "
        f"be {batch_size / n_devices:g}; use a multiple of {n_devices}, e.g. "
        f"{max(1, round(batch_size / n_devices)) * n_devices}")


def weight_spec(shape, fsdp_size: int, axes=MESH_AXES[1]) -> P:
  """Shards a matrix along its largest axis that `fsdp_size` divides, over the mesh axis (or
  axes) `axes` of that size; anything else replicated.

  Vectors (biases, LayerNorm scales) and scalars stay whole: they are a sliver of the memory, and
  splitting them would add a collective each. The rule reads only the shape, so a parameter and
  its AdamW moments always get the same layout.
  """
  if fsdp_size == 1 or len(shape) < 2:
    return P()
  for axis in sorted(range(len(shape)), key=lambda a: (-shape[a], a)):
    if shape[axis] % fsdp_size == 0:
      return P(*[axes if a == axis else None for a in range(len(shape))])
  return P()


def tree_shardings(abstract_tree, mesh: Mesh):
  """NamedShardings for a pytree of arrays or ShapeDtypeStructs (train state, params)."""
  fsdp_size = mesh.shape[MESH_AXES[1]]
  return jax.tree.map(lambda x: NamedSharding(mesh, weight_spec(x.shape, fsdp_size)),
                      abstract_tree)


def state_shardings(abstract_state, mesh: Mesh, shard_optimizer: bool = False):
  """NamedShardings of a gptjax.step.TrainState: parameters and optimizer state as
  tree_shardings lays them out; with `shard_optimizer` (ZeRO-1) the optimizer state (AdamW's
  moments, twice the parameters) split over every device of the mesh instead. The parameters
  stay as they are (whole on each device with data parallelism), so the forward and backward
  passes are data parallelism's; XLA reduces the gradients only onto the shard of the moments
  each device updates and gathers the updated parameters back."""
  shardings = tree_shardings(abstract_state, mesh)
  if not shard_optimizer:
    return shardings
  every = mesh.devices.size
  return shardings.replace(opt_state=jax.tree.map(
      lambda x: NamedSharding(mesh, weight_spec(x.shape, every, MESH_AXES)),
      abstract_state.opt_state))


def init_sharded(init_fn, shardings_of, *args):
  """(init_fn(*args), its shardings), each array created directly in its shards:
  `shardings_of(abstract result)` gives them (e.g. state_shardings).

  The whole state never exists on one device, so a model larger than one card can start.
  """
  shardings = shardings_of(jax.eval_shape(init_fn, *args))
  return jax.jit(init_fn, out_shardings=shardings)(*args), shardings


def process_rows(placement: NamedSharding, batch_size: int) -> slice:
  """The rows of each global batch that this process's devices hold, as one slice."""
  starts = sorted({idx[0].start or 0 for idx in
                   placement.addressable_devices_indices_map((batch_size,)).values()})
  per_device = batch_size // placement.mesh.devices.size
  rows = slice(starts[0], starts[-1] + per_device)
  if rows.stop - rows.start != per_device * len(starts):
    raise ConfigError(f"mesh_data: this process's devices hold rows {starts} of the batch, not one "
                      "contiguous block; use the default mesh_data=-1, mesh_fsdp=1")
  return rows


def from_process_0(text: str, size: int = 256) -> str:
  """Process 0's `text` on every process. The names a multi-process run writes under (its final
  model's, its run id) must agree: its collective saves wait for every process at one path, and a
  clock read one second apart on two machines would name two paths and wait forever."""
  if jax.process_count() == 1:
    return text
  from jax.experimental import multihost_utils
  raw = text.encode()
  if len(raw) > size:
    raise ValueError(f"from_process_0: {len(raw)} bytes, more than {size}")
  buffer = np.zeros(size, np.uint8)
  buffer[:len(raw)] = np.frombuffer(raw, np.uint8)
  return bytes(np.asarray(multihost_utils.broadcast_one_to_all(buffer))).rstrip(b"\0").decode()


def batch_feeder(mesh: Mesh, batch_size: int):
  """(rows, put) for global batches of `batch_size`: the rows this process reads, and the copy of
  those rows (an array, or a tuple of arrays) into one global array each, split over the mesh."""
  placement = NamedSharding(mesh, BATCH_SPEC)
  rows = process_rows(placement, batch_size)

  def put(local):
    if isinstance(local, tuple):
      return tuple(put(x) for x in local)
    return jax.make_array_from_process_local_data(placement, np.asarray(local),
                                                  (batch_size,) + local.shape[1:])

  return rows, put
