"""Issue 20, the data side: a bad split file, cache folder or HOME is one line naming the path, the
value and what is allowed (never a traceback, nothing on disk lost), and a damaged token cache is
rebuilt with a log line instead of being trained on."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO
from gptjax import data, sources
from gptjax.config import ConfigError

SPLIT_ALLOWED = "a split file must be UTF-8 text with at least one non-blank line"
CACHE_ALLOWED = "point --data_cache_dir or GPTJAX_CACHE at a writable folder"


def _quiet(message):
  pass


def _one_line(excinfo) -> str:
  message = str(excinfo.value)
  assert "\n" not in message
  return message


@pytest.fixture
def folder(corpus, tmp_path):
  """A copy of the corpus folder, to damage."""
  return shutil.copytree(corpus, tmp_path / "corpus")


def _loaders(folder, split, cache):
  """The two ways in: the trainer's load, and `--check_only`'s check."""
  return (lambda: data.load_tokens(str(folder), split, "gpt2", cache_dir=str(cache), log=_quiet),
          lambda: data.check_sources(str(folder), "gpt2", str(cache)))


def _cached_files(cache):
  return sorted(os.path.join(root, f) for root, _, files in os.walk(cache) for f in files
                if f.endswith((".bin", ".json")))


# ----------------------------------------------------------------------------- split files


@pytest.mark.parametrize("split", data.SPLITS)
@pytest.mark.parametrize("content,what", [(b"", "empty (0 bytes)"),
                                          (b" \n\n \n", "blank (5 bytes)")], ids=["empty", "blank"])
def test_an_empty_split_file_is_one_line(folder, tmp_path, split, content, what):
  # Before: datasets.exceptions.DatasetGenerationError with a traceback (a blank file tokenized).
  path = folder / f"{split}.txt"
  path.write_bytes(content)
  for load in _loaders(folder, split, tmp_path / "cache"):
    with pytest.raises(ConfigError) as e:
      load()
    assert _one_line(e) == f"dataset: {path} is {what}; {SPLIT_ALLOWED}"
  assert path.read_bytes() == content
  assert _cached_files(tmp_path / "cache") == []


def test_non_utf8_bytes_name_the_file_and_byte_offset(folder, tmp_path):
  # Before: datasets.exceptions.DatasetGenerationError with a traceback, no file or offset.
  path = folder / "valid.txt"
  text = path.read_bytes()
  path.write_bytes(text + b" caf\xe9 au lait\n")
  for load in _loaders(folder, "valid", tmp_path / "cache"):
    with pytest.raises(ConfigError) as e:
      load()
    assert _one_line(e) == (f"dataset: {path} is not UTF-8: byte 0xe9 at byte offset "
                            f"{len(text) + 4}; {SPLIT_ALLOWED}")
  assert _cached_files(tmp_path / "cache") == []


def test_utf8_check_follows_characters_across_its_blocks(tmp_path):
  path = tmp_path / "train.txt"
  head = b"a" * ((1 << 24) - 1)  # the check reads 16 MiB blocks: the 'é' straddles two
  path.write_bytes(head + "é".encode() + b"\nb\xff\n")
  with pytest.raises(ConfigError, match=f"byte 0xff at byte offset {len(head) + 4};"):
    sources.check_split_file(str(path))
  path.write_bytes(b"text\n\xc3")  # a character cut by the end of the file
  with pytest.raises(ConfigError, match="byte 0xc3 at byte offset 5;"):
    sources.check_split_file(str(path))


@pytest.mark.parametrize("missing", ["train.txt", "valid.txt", "test.txt"])
def test_check_sources_needs_all_three_splits(folder, missing):
  # Before: --check_only passed a folder without test.txt; the run died after the launcher had
  # said "Training started".
  os.remove(folder / missing)
  with pytest.raises(ConfigError) as e:
    data.check_sources(str(folder), "gpt2")
  split = missing.removesuffix(".txt")
  names = "valid or validation" if split == "valid" else split
  assert _one_line(e) == (
      f"dataset: folder {str(folder)!r} has no {names} files ({split}.txt|.jsonl|.parquet, "
      f"{split}-*.EXT or {split}/); held_out_fraction > 0 holds valid and test out of train")


def test_check_sources_takes_validation_txt_and_hub_names(folder, tmp_path):
  os.rename(folder / "valid.txt", folder / "validation.txt")
  data.check_sources(str(folder), "gpt2", str(tmp_path / "cache"))
  data.check_sources("wikitext-103", "gpt2")  # a hub dataset: the tokenizer only, no network
  assert not (tmp_path / "cache").exists()  # a check writes nothing


def test_check_sources_needs_the_tokenizer(corpus, monkeypatch):
  def offline(name):
    raise ConnectionError("no network")

  monkeypatch.setattr(data.tiktoken, "get_encoding", offline)
  with pytest.raises(ConfigError) as e:
    data.check_sources(corpus, "gpt4")
  assert _one_line(e).startswith("tokenizer: cannot load the cl100k_base vocabulary")


@pytest.mark.parametrize("damage", ["no test.txt", "empty valid.txt"])
def test_trainer_check_loads_what_the_trainer_loads(tiny_config, folder, damage):
  from gptjax import trainer

  if damage == "no test.txt":
    os.remove(folder / "test.txt")
  else:
    (folder / "valid.txt").write_text("")
  tiny_config.dataset = str(folder)
  with pytest.raises(ConfigError, match="^dataset: .*(test.txt|valid.txt is empty)"):
    trainer.check(tiny_config)
  assert not os.path.exists(tiny_config.output_dir)


# ---------------------------------------------------------------------------- cache folder


def test_cache_env_pointing_at_a_file_is_one_line(folder, tmp_path, monkeypatch):
  # Before: FileExistsError / NotADirectoryError with a traceback.
  cache_file = tmp_path / "cache-file"
  cache_file.write_text("keep me")
  monkeypatch.setenv("GPTJAX_CACHE", str(cache_file))
  for load in (lambda: data.load_tokens(str(folder), "valid", "gpt2", log=_quiet),
               lambda: data.check_sources(str(folder), "gpt2")):
    with pytest.raises(ConfigError) as e:
      load()
    assert _one_line(e) == (f"data_cache_dir: GPTJAX_CACHE={cache_file} is a file, not a folder; "
                            f"{CACHE_ALLOWED}")
  under = cache_file / "tokens"
  with pytest.raises(ConfigError) as e:
    data.load_tokens(str(folder), "valid", "gpt2", cache_dir=str(under), log=_quiet)
  assert _one_line(e) == (f"data_cache_dir: --data_cache_dir {under} lies under a file, "
                          f"{cache_file}; {CACHE_ALLOWED}")
  assert cache_file.read_text() == "keep me"


def _unwritable_folder(tmp_path) -> str:
  if os.geteuid() != 0:
    path = tmp_path / "read-only"
    path.mkdir()
    path.chmod(0o555)
    return str(path)
  # root writes through permission bits; sysfs refuses even root a new folder
  path = "/sys/gptjax-test-cache"
  try:
    os.mkdir(path)
  except OSError:
    return path
  os.rmdir(path)
  pytest.skip("no folder here that root cannot write")


def test_an_unwritable_cache_folder_is_one_line(folder, tmp_path):
  cache = _unwritable_folder(tmp_path)
  with pytest.raises(ConfigError) as e:
    data.load_tokens(str(folder), "valid", "gpt2", cache_dir=cache, log=_quiet)
  message = _one_line(e)
  assert message.startswith(f"data_cache_dir: --data_cache_dir {cache} cannot be written (")
  assert message.endswith(f"); {CACHE_ALLOWED}")


def test_a_read_only_home_is_never_written(folder, tmp_path):
  # Before: HF datasets made ~/.cache/huggingface even with GPTJAX_CACHE set (NotADirectoryError).
  home = tmp_path / "home"
  if os.geteuid() != 0:
    home.mkdir()
    home.chmod(0o555)
  else:  # root ignores modes: a file as HOME fails any folder made under it
    home.write_text("")
  env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "XDG_", "GPTJAX_"))}
  env.update(HOME=str(home), GPTJAX_CACHE=str(tmp_path / "cache"), PYTHONPATH=REPO)
  code = ("import sys; from gptjax import data; "
          "print(len(data.load_tokens(sys.argv[1], 'valid', 'gpt2', log=lambda m: None)))")
  r = subprocess.run([sys.executable, "-c", code, str(folder)], env=env, capture_output=True,
                     text=True, timeout=300)
  assert r.returncode == 0, r.stderr
  assert int(r.stdout) > 0
  assert (os.listdir(home) == []) if home.is_dir() else (home.read_text() == "")
  assert _cached_files(tmp_path / "cache")  # the tokens went to the token cache


# ----------------------------------------------------------------------------- token cache


def _rewrite_meta(meta_path, **changes):
  with open(meta_path) as f:
    meta = json.load(f)
  meta.update(changes)
  with open(meta_path, "w") as f:
    json.dump({k: v for k, v in meta.items() if v is not None}, f)


def _set_id(bin_path, index, value):
  ids = np.memmap(bin_path, dtype=np.uint16, mode="r+")
  ids[index] = value
  ids.flush()
  del ids


DAMAGES = {  # name: (damage(bin_path, meta_path, n_tokens), the reason logged)
    "bin truncated": (lambda b, m, n: os.truncate(b, 2 * n - 6),
                      lambda b, m, n: f"{2 * n - 6:,} bytes where {os.path.basename(m)} says "
                                      f"{n:,} uint16 ids"),
    "bin empty": (lambda b, m, n: os.truncate(b, 0),
                  lambda b, m, n: f"0 bytes where {os.path.basename(m)} says {n:,} uint16 ids"),
    "bin missing": (lambda b, m, n: os.remove(b),
                    lambda b, m, n: f"{os.path.basename(b)} is missing"),
    "json empty": (lambda b, m, n: open(m, "w").close(),
                   lambda b, m, n: f"{os.path.basename(m)} does not read (JSONDecodeError)"),
    "json cut": (lambda b, m, n: os.truncate(m, 20),
                 lambda b, m, n: f"{os.path.basename(m)} does not read (JSONDecodeError)"),
    "id out of vocabulary": (lambda b, m, n: _set_id(b, 3, 60000),
                             lambda b, m, n: "id 60000 is outside gpt2's 50257 ids"),
    "id out of vocabulary, no fingerprint": (
        lambda b, m, n: (_set_id(b, 3, 50257), _rewrite_meta(m, fingerprint=None)),
        lambda b, m, n: "id 50257 is outside gpt2's 50257 ids"),
    "one id changed": (lambda b, m, n: _set_id(b, n // 2, 11),
                       lambda b, m, n: "its ids differ from the fingerprint written with them"),
}


@pytest.fixture(scope="module")
def valid_cache(corpus, tmp_path_factory):
  """A token cache holding the corpus's valid split, and its ids."""
  cache = tmp_path_factory.mktemp("valid_cache")
  tokens = np.array(data.load_tokens(corpus, "valid", "gpt2", cache_dir=str(cache), log=_quiet))
  return cache, tokens


@pytest.mark.parametrize("damage", DAMAGES, ids=str)
def test_a_damaged_token_cache_is_rebuilt_with_a_log_line(corpus, valid_cache, tmp_path, damage):
  # Before: a traceback (ValueError from np.memmap, JSONDecodeError, FileNotFoundError), or, for
  # ids outside the vocabulary, training on them (NaN losses blamed on the learning rate).
  cache = shutil.copytree(valid_cache[0], tmp_path / "cache")
  expected = valid_cache[1]
  (name,) = os.listdir(cache)  # the split's folder: one shard, 00000.bin and its 00000.json
  bin_path, meta_path = str(cache / name / "00000.bin"), str(cache / name / "00000.json")
  harm, reason = DAMAGES[damage]
  harm(bin_path, meta_path, len(expected))
  logs = []
  tokens = data.load_tokens(corpus, "valid", "gpt2", cache_dir=str(cache), log=logs.append)
  np.testing.assert_array_equal(tokens, expected)
  assert logs[0] == (f"token cache {bin_path} is damaged "
                     f"({reason(bin_path, meta_path, len(expected))}); rebuilding")
  assert logs[1].startswith("Tokenizing ")
  again = data.load_tokens(corpus, "valid", "gpt2", cache_dir=str(cache),
                           log=lambda m: pytest.fail(f"the rebuilt cache failed its checks: {m}"))
  np.testing.assert_array_equal(again, expected)
