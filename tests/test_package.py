"""What ships in the package: the presets, the embedded corpus and GPT-2 vocabulary (read with no
network and no tiktoken cache), and the install's package data that carries them."""
import fnmatch
import hashlib
import inspect
import os
import socket
import tempfile
import tomllib

import pytest

from gptjax import config as config_lib, data
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
  for split in data.SPLITS:
    path = data.local_split_path(config_lib.SAMPLE_DIR, split)
    with open(path, "rb") as f:
      blob = f.read()
    assert hashlib.sha256(blob).hexdigest() in readme, split
    assert f"{len(blob):,}" in readme and blob.endswith(b"\n")


@pytest.fixture
def offline(monkeypatch, tmp_path):
  """No network, no TIKTOKEN_CACHE_DIR, an empty HOME and temporary folder."""
  def refuse(*args, **kwargs):
    raise OSError("network disabled in this test")
  monkeypatch.setattr(socket.socket, "connect", refuse)
  monkeypatch.setattr(socket, "create_connection", refuse)
  monkeypatch.delenv("TIKTOKEN_CACHE_DIR", raising=False)
  monkeypatch.delenv("DATA_GYM_CACHE_DIR", raising=False)
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  (tmp_path / "tmp").mkdir()
  monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # tiktoken's default cache
  data._embedded_gpt2.cache_clear()
  yield tmp_path
  data._embedded_gpt2.cache_clear()


def test_gpt2_from_the_embedded_vocabulary_offline(offline):
  enc = data.get_tokenizer("gpt2")
  assert enc.n_vocab == 50257 and enc.eot_token == 50256
  assert enc.encode("Hello world") == [15496, 995] and enc.encode("hello world") == [31373, 995]
  assert enc.decode(enc.encode_ordinary(" = Valkyria Chronicles III = \n")) == \
      " = Valkyria Chronicles III = \n"
  assert "TIKTOKEN_CACHE_DIR" not in os.environ   # restored as it was
  assert not os.listdir(offline / "tmp")           # tiktoken's default cache was not written


def test_gpt2_vocabulary_hashes_are_tiktokens_pins():
  """The sha256 checked on load are the ones tiktoken pins for its own gpt2 (same files)."""
  from tiktoken_ext import openai_public
  source = inspect.getsource(openai_public.gpt2)
  assert data.GPT2_VOCAB_BPE_SHA256 in source and data.GPT2_ENCODER_JSON_SHA256 in source


def test_other_tokenizers_offline_fail_in_one_line(offline):
  with pytest.raises(config_lib.ConfigError, match=r"^tokenizer: cannot load the cl100k_base "
                     r"vocabulary .*TIKTOKEN_CACHE_DIR.*--tokenizer gpt2"):
    data.get_tokenizer("gpt4")
