"""With no network, no TIKTOKEN_CACHE_DIR and an empty HOME: GPT-2's tokenizer comes from the
package's own files; other tokenizers and the Hub's datasets fail at once, in one line that says
what to use instead."""
import inspect
import os
import socket
import tempfile
import time

import pytest

from gptjax import config as config_lib, data, sources


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


def test_hub_dataset_offline_fails_fast_in_one_line(offline, monkeypatch, capfd):
  """No retries (HF's client spends ~25 s on them): a 3 s probe, then HF's offline mode, in which
  a dataset not in HF's cache fails at once; the message points at the shipped sample."""
  import datasets
  import huggingface_hub.constants
  monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(offline / "hf" / "datasets"))
  monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(offline / "hf" / "hub"))
  # Not in offline mode to start with (read at import: an earlier test may have set it).
  monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
  monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
  start = time.monotonic()
  with pytest.raises(config_lib.ConfigError) as e:
    sources.load_text_rows("wikitext", "valid")
  assert time.monotonic() - start < 15
  message = str(e.value)
  assert message.startswith("dataset: cannot load 'wikitext' from the Hugging Face Hub (no "
                            "connection to huggingface.co)") and "\n" not in message
  assert f"--dataset {config_lib.SAMPLE_DIR}" in message
  assert not huggingface_hub.constants.HF_HUB_OFFLINE and not datasets.config.HF_HUB_OFFLINE
  assert "retry" not in capfd.readouterr().err.lower()
