"""What ships in the package: the presets, the embedded corpus and GPT-2 vocabulary, and the
install's package data that carries them (tests/test_offline.py reads them with no network)."""
import fnmatch
import hashlib
import os
import tomllib

from gptjax import config as config_lib, sources
from conftest import REPO


def test_package_data_covers_every_shipped_file():
  """pyproject.toml's package discovery and package-data globs take every file of the folders a
  non-editable install must carry (a file they missed would be absent from an installed gptjax)."""
  with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
    setuptools_config = tomllib.load(f)["tool"]["setuptools"]
  (include,) = setuptools_config["packages"]["find"]["include"]
  globs = setuptools_config["package-data"]["*"] + ["*.py"]
  package = config_lib.PACKAGE_DIR
  shipped = []
  for folder in ("configs", "assets", "csrc"):
    for root, dirs, files in os.walk(os.path.join(package, folder)):
      dirs[:] = [d for d in dirs if d != "__pycache__"]
      shipped += [os.path.relpath(os.path.join(root, f), os.path.dirname(package)) for f in files]
  assert {"gptjax/configs/tiny.py", "gptjax/assets/sample/train.txt",
          "gptjax/assets/gpt2/vocab.bpe"} <= set(shipped)
  for path in shipped:
    folder, name = os.path.split(path)
    assert fnmatch.fnmatch(folder.replace(os.sep, "."), include), path
    assert any(fnmatch.fnmatch(name, g) for g in globs), path
  for preset in config_lib.PRESETS + ("default",):
    assert os.path.isfile(os.path.join(config_lib.CONFIGS_DIR, f"{preset}.py"))


def test_sample_corpus_is_what_its_readme_says():
  with open(os.path.join(config_lib.SAMPLE_DIR, "README.md")) as f:
    readme = f.read()
  assert "CC BY-SA" in readme and "Merity" in readme
  for split in sources.SPLITS:
    (path,) = sources.split_files(config_lib.SAMPLE_DIR, split)
    with open(path, "rb") as f:
      blob = f.read()
    assert hashlib.sha256(blob).hexdigest() in readme, split
    assert f"{len(blob):,}" in readme and blob.endswith(b"\n")
