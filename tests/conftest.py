"""Shared fixtures: a small real-text corpus cut from the embedded one (gptjax/assets/sample) and
a shrunken config that trains on it in seconds on the CPU. Nothing outside the repository is read."""
import glob
import os
import shutil
import struct

import pytest

from gptjax.config import SAMPLE_DIR, base_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _head(src, dst, n_lines):
  with open(src) as f:
    lines = f.readlines()[:n_lines]
  with open(dst, "w") as f:
    f.writelines(lines)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
  """A local dataset folder: ~25K training tokens, ~2-5K validation and test tokens."""
  folder = tmp_path_factory.mktemp("corpus") / "wt2small"
  folder.mkdir()
  _head(os.path.join(SAMPLE_DIR, "train.txt"), folder / "train.txt", 520)
  _head(os.path.join(SAMPLE_DIR, "valid.txt"), folder / "valid.txt", 50)
  _head(os.path.join(SAMPLE_DIR, "test.txt"), folder / "test.txt", 50)
  return str(folder)


@pytest.fixture(scope="session")
def token_cache(tmp_path_factory):
  return str(tmp_path_factory.mktemp("token_cache"))


@pytest.fixture(scope="session")
def make_tiny_config(corpus, token_cache):
  """tiny_config's maker, for fixtures wider than one test (e.g. one reference run per module)."""
  def make(output_dir):
    config = base_config()
    config.update(dataset=corpus, data_cache_dir=token_cache, output_dir=str(output_dir),
                  d_model=32, num_heads=2, num_layers=2, d_ff=64, max_seq_len=32, batch_size=8,
                  epochs=2, lr=3e-3, warmup_steps=10, log_interval=25, dropout=0.1,
                  sample_prompts="", weight_monitor_interval=25, sanity_check_interval=25)
    return config
  return make


# On top of tiny_config, a run whose snapshots the resume tests read: 6 steps per epoch on
# short_corpus, a snapshot every 3 steps, the newest 3 kept after training.
SNAPSHOT_RUN = dict(max_samples=20, snapshot_interval=3, keep_last_n_snapshots=3, log_interval=1,
                    delete_snapshots_after_training=False)


def copy_corpus(corpus, folder, n_valid=15, n_test=10) -> str:
  """`corpus` with short validation and test splits (runs that evaluate after every epoch and at
  the end: exactness does not need long ones)."""
  os.makedirs(folder)
  shutil.copy(os.path.join(corpus, "train.txt"), os.path.join(folder, "train.txt"))
  for split, n_lines in (("valid", n_valid), ("test", n_test)):
    _head(os.path.join(corpus, f"{split}.txt"), os.path.join(folder, f"{split}.txt"), n_lines)
  return str(folder)


@pytest.fixture(scope="session")
def make_snapshot_config(make_tiny_config, corpus, tmp_path_factory):
  """make(output_dir, **changes): tiny_config plus SNAPSHOT_RUN on the short corpus."""
  short = copy_corpus(corpus, tmp_path_factory.mktemp("corpus") / "short")

  def make(output_dir, **changes):
    config = make_tiny_config(output_dir)
    config.update(dataset=short, **SNAPSHOT_RUN)
    config.update(**changes)
    return config
  return make


@pytest.fixture(scope="module")
def reference(make_snapshot_config, tmp_path_factory):
  """(config, result) of one uninterrupted snapshot run, its snapshots kept: the yardstick of a
  module's interrupted and resumed runs."""
  from gptjax import trainer
  config = make_snapshot_config(tmp_path_factory.mktemp("reference") / "run")
  result = trainer.train_and_evaluate(config.copy_and_resolve_references())
  assert result["status"] == "completed"
  return config, result


@pytest.fixture
def tiny_config(make_tiny_config, tmp_path):
  return make_tiny_config(tmp_path / "run")


def read_run_log(run_dir: str) -> str:
  """The text of a run's one log file (logs/*.log)."""
  (path,) = glob.glob(os.path.join(run_dir, "logs", "*.log"))
  with open(path) as f:
    return f.read()


def same_tree(a, b) -> bool:
  """The same pytree structure and bit-identical leaves."""
  import jax
  import numpy as np
  return jax.tree.structure(a) == jax.tree.structure(b) and all(
      np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def read_tensorboard_scalars(run_dir: str) -> dict:
  """{tag: {step: value}} of a run's TensorBoard files (TFRecord framing, tensorboardX protos)."""
  from tensorboardX.proto import event_pb2
  out = {}
  for path in glob.glob(os.path.join(run_dir, "tensorboard", "events.*")):
    with open(path, "rb") as f:
      blob = f.read()
    pos = 0
    while pos < len(blob):
      (length,) = struct.unpack("<Q", blob[pos:pos + 8])
      event = event_pb2.Event.FromString(blob[pos + 12:pos + 12 + length])
      for v in event.summary.value:
        out.setdefault(v.tag, {})[event.step] = v.simple_value
      pos += 12 + length + 4
  return out


@pytest.fixture(scope="session", autouse=True)
def xla_cache(tmp_path_factory):
  """One persistent compilation cache for the whole suite, in process and in subprocesses (whose
  environment takes the returned variables): the many runs of the same tiny programs compile
  them once."""
  import jax
  from jax.experimental.compilation_cache import compilation_cache
  path = str(tmp_path_factory.mktemp("xla_cache"))
  settings = {"jax_compilation_cache_dir": path, "jax_persistent_cache_min_compile_time_secs": 0,
              "jax_persistent_cache_min_entry_size_bytes": -1}
  before = {name: getattr(jax.config, name) for name in settings}
  for name, value in settings.items():
    jax.config.update(name, value)
  compilation_cache.reset_cache()  # the cache is set up at the first compilation after this
  yield {name.upper(): str(value) for name, value in settings.items()}
  for name, value in before.items():
    jax.config.update(name, value)
  compilation_cache.reset_cache()
