"""Data: the token cache, windows that cover a split without overlap, a seeded epoch order."""
import json
import os

import numpy as np
import pytest
import tiktoken

from gptjax import data, sources
from gptjax.config import ConfigError


def test_token_cache_round_trip(corpus, tmp_path):
  cache = str(tmp_path / "cache")
  first = np.array(data.load_tokens(corpus, "valid", "gpt2", cache_dir=cache, log=lambda m: None))
  (folder,) = os.listdir(cache)  # one folder per split: its shards, then meta.json
  assert sorted(os.listdir(os.path.join(cache, folder))) == ["00000.bin", "00000.json", "meta.json"]
  again = data.load_tokens(corpus, "valid", "gpt2", cache_dir=cache,
                           log=lambda m: pytest.fail("tokenized twice"))
  np.testing.assert_array_equal(first, again)
  assert again.dtype == np.uint16  # gpt2's 50257 ids fit in 16 bits
  enc = data.get_tokenizer("gpt2")
  with open(os.path.join(corpus, "valid.txt")) as f:
    text = f.read()
  assert enc.decode(first[:-1].tolist()) == text  # the split, losslessly, plus end-of-text
  assert first[-1] == enc.eot_token


def test_cache_meta_holds_the_fingerprint_of_its_ids(corpus, tmp_path):
  tokens = data.load_tokens(corpus, "test", "gpt2", cache_dir=str(tmp_path), log=lambda m: None)
  (folder,) = os.listdir(tmp_path)
  with open(tmp_path / folder / "meta.json") as f:
    meta = json.load(f)
  assert meta["fingerprint"] == data.fingerprint(np.asarray(tokens))  # written with the ids
  assert meta["n_tokens"] == len(tokens) and meta["n_vocab"] == 50257


def test_cache_key_separates_tokenizer_and_max_samples(corpus):
  keys = {data.cache_key(corpus, "train", t, n) for t in ("gpt2", "gpt4") for n in (0, 10)}
  assert len(keys) == 4


def test_large_vocabulary_uses_uint32(corpus, tmp_path, monkeypatch):
  # gpt4o's 200K ids need 32 bits, but its vocabulary is a download: gpt2's, end-of-text at 70000.
  gpt2 = data.get_tokenizer("gpt2")
  large = tiktoken.Encoding(name="large", pat_str=gpt2._pat_str,
                            mergeable_ranks=gpt2._mergeable_ranks,
                            special_tokens={"<|endoftext|>": 70000})
  monkeypatch.setattr(data, "get_tokenizer", lambda name: large)
  tokens = data.load_tokens(corpus, "test", "gpt4o", cache_dir=str(tmp_path), log=lambda m: None)
  assert tokens.dtype == np.uint32
  assert tokens[-1] == 70000  # above 16 bits, kept


def test_windows_cover_the_split_without_overlap():
  tokens = np.arange(1000, dtype=np.uint16)
  w = data.TrainWindows(tokens, seq_len=9, batch_size=4, seed=0)
  assert w.n_windows == 100 and w.steps_per_epoch == 25
  rows = np.concatenate(list(w.epoch(0)))
  assert rows.shape == (100, 10)
  np.testing.assert_array_equal(np.sort(rows.reshape(-1)), np.arange(1000))


def test_order_depends_only_on_seed_and_epoch():
  tokens = np.arange(5000, dtype=np.uint16)
  a = data.TrainWindows(tokens, 9, 4, seed=1)
  b = data.TrainWindows(tokens, 9, 4, seed=1)
  np.testing.assert_array_equal(a.batch(3, 7), b.batch(3, 7))  # random access = sequential
  np.testing.assert_array_equal(np.concatenate(list(a.epoch(2))), np.concatenate(list(b.epoch(2))))
  assert not np.array_equal(a.order(0), a.order(1))
  assert not np.array_equal(a.order(0), data.TrainWindows(tokens, 9, 4, seed=2).order(0))
  np.testing.assert_array_equal(np.concatenate(list(a.epoch(0, start=5))),
                                np.concatenate(list(a.epoch(0)))[5 * 4:])


def test_eval_batches_predict_every_token_once():
  tokens = np.arange(103, dtype=np.uint16)
  batches = list(data.eval_batches(tokens, seq_len=10, batch_size=4))
  targets = np.concatenate([t[w > 0] for _, t, w in batches])
  np.testing.assert_array_equal(targets, np.arange(1, 103))
  inputs = np.concatenate([x[w > 0] for x, _, w in batches])
  np.testing.assert_array_equal(inputs, np.arange(0, 102))
  assert all(x.shape == (4, 10) for x, _, _ in batches)


def test_missing_train_file_and_short_split_are_clear_errors(tmp_path):
  with pytest.raises(ConfigError, match="valid"):
    sources.split_files(str(tmp_path), "valid")
  with pytest.raises(ConfigError, match="batch_size"):
    data.TrainWindows(np.arange(50, dtype=np.uint16), seq_len=9, batch_size=8, seed=0)


def test_offline_hub_failure_is_one_line(monkeypatch, tmp_path):
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
  monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
  with pytest.raises(ConfigError) as e:
    data.load_tokens("wikitext", "valid", "gpt2", cache_dir=str(tmp_path), log=lambda m: None)
  message = str(e.value)
  assert "\n" not in message and "--dataset" in message and "local folder" in message
