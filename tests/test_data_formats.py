"""Issue 24, data beyond WikiText: folders of .txt/.jsonl/.parquet files, hub datasets (`hf:`,
through a local folder), a held-out fraction, multi-threaded tokenizing into shards that an
interrupted preparation resumes, windows read across shards, and `python -m gptjax.prepare`.
Every corpus is generated here and a few KB long."""
import json
import os
import random

import numpy as np
import pytest

from gptjax import data, prepare, sources
from gptjax.config import SAMPLE_DIR, ConfigError

WORDS = ("the cat sat on a mat while rain fell over quiet hills and 1885 rivers ran , . "
         "Ünïcödé 字 emoji 🙂 tabs\tand  spaces").split(" ")


def _quiet(message):
  pass


def _documents(n: int, seed: int = 0) -> list[str]:
  rng = random.Random(seed)
  return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 40)))
          + ("\n" if i % 3 else "\n\n second paragraph\n") for i in range(n)]


def _expected(docs) -> np.ndarray:
  """Each document encoded on its own, an end-of-text after each: nanoGPT's prepare.py."""
  enc = data.get_tokenizer("gpt2")
  return np.array([t for d in docs for t in enc.encode_ordinary(d) + [enc.eot_token]], np.uint16)


def _write_jsonl(path, docs, column="text"):
  with open(path, "w") as f:
    for d in docs:
      f.write(json.dumps({"id": 1, column: d}) + "\n")


def _write_parquet(path, docs, column="text"):
  import pyarrow as pa
  import pyarrow.parquet as pq
  pq.write_table(pa.table({column: docs, "n": list(range(len(docs)))}), path, row_group_size=7)


@pytest.fixture(scope="module")
def docs():
  return {"train": _documents(60, 1), "valid": _documents(12, 2), "test": _documents(12, 3)}


@pytest.fixture(scope="module")
def folders(docs, tmp_path_factory):
  """The same documents as .jsonl files (train in two, `validation` named), as .parquet files
  in split subfolders, and as .txt files (a file a document)."""
  root = tmp_path_factory.mktemp("formats")
  jsonl, parquet, txt = root / "jsonl", root / "parquet", root / "txt"
  jsonl.mkdir()
  _write_jsonl(jsonl / "train-00000.jsonl", docs["train"][:25], "body")
  _write_jsonl(jsonl / "train-00001.jsonl", docs["train"][25:], "body")
  _write_jsonl(jsonl / "validation.jsonl", docs["valid"], "body")
  _write_jsonl(jsonl / "test.jsonl", docs["test"], "body")
  (jsonl / "notes.md").write_text("not data")
  for split, split_docs in docs.items():
    (parquet / split).mkdir(parents=True)
    _write_parquet(parquet / split / "part-0.parquet", split_docs[:10])
    _write_parquet(parquet / split / "part-1.parquet", split_docs[10:])
    (txt / split).mkdir(parents=True)
    for i, d in enumerate(split_docs):
      (txt / split / f"{i:03d}.txt").write_text(d)
  return {"jsonl": str(jsonl), "parquet": str(parquet), "txt": str(txt)}


# ------------------------------------------------------------------------------- what stays


def test_existing_data_keeps_its_tokens(tmp_path):
  """The fingerprints of the sample before issue 24 (one thread, HF's `text` builder, one .bin):
  the snapshots of existing runs store them."""
  before = {("train", 0): "5d35b0c52fe3a75953d02295fe02f80470c9e8e691038e7f51eb5f16500fc5c3",
            ("valid", 0): "3724b05ba6b11c1dbb017111d79b3c390f455d98315cd6703c532a426ee4d0ce",
            ("test", 0): "ff29a2c8994e2b757d4f095a04f768348bcb3a20d69c54c9c9958d7ac49aa106",
            ("train", 3000): "160a853b055ca8897e06dba68d40c824eef38102f524e241dfbf2eb8d761a337"}
  for (split, max_samples), digest in before.items():
    tokens = data.load_tokens(SAMPLE_DIR, split, "gpt2", max_samples, str(tmp_path), _quiet)
    assert data.fingerprint(np.asarray(tokens)) == data.fingerprint(tokens) == f"sha256:{digest}"


def test_a_cache_file_from_before_is_replaced_by_a_folder(corpus, tmp_path):
  folder = data.cache_folder(corpus, "valid", "gpt2", 0, str(tmp_path))
  for ext in (".bin", ".json"):  # the same key named one .bin and its .json
    open(folder + ext, "w").close()
  data.load_tokens(corpus, "valid", "gpt2", cache_dir=str(tmp_path), log=_quiet)
  assert os.listdir(tmp_path) == [os.path.basename(folder)]


def test_tiktoken_numpy_encoding_is_encode_ordinary():
  enc = data.get_tokenizer("gpt2")
  text = "a <|endoftext|> stays text, \ud800 a lone surrogate is repaired"
  ids, n_bytes = data._encode(enc, [text, "b"], [True, False], np.uint16)
  assert ids.tolist() == enc.encode_ordinary(text) + [enc.eot_token] + enc.encode_ordinary("b")
  assert n_bytes == len(text.encode("utf-8", "surrogatepass")) + 1


def test_epoch_order_is_numpys_permutation_in_int32():
  w = data.TrainWindows(np.arange(100_000, dtype=np.uint16), 9, 4, seed=7)
  assert w.order(3).dtype == np.int32
  np.testing.assert_array_equal(w.order(3), np.random.default_rng([7, 3]).permutation(10_000))


# ------------------------------------------------------------------------------------ formats


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "txt"])
def test_every_format_gives_each_document_and_an_end_of_text(folders, docs, fmt, tmp_path):
  for split in data.SPLITS:
    tokens = data.load_tokens(folders[fmt], split, "gpt2", cache_dir=str(tmp_path), log=_quiet,
                              text_column="body" if fmt == "jsonl" else "text")
    np.testing.assert_array_equal(tokens, _expected(docs[split]))


def test_a_hub_dataset_streams_through_the_same_path(folders, docs, tmp_path):
  """hf:NAME with a local folder as NAME: HF `datasets` streams it, offline, as it would a hub
  dataset; the tokens are the .jsonl folder's."""
  dataset = f"hf:{folders['jsonl']}"
  for split in data.SPLITS:
    tokens = data.load_tokens(dataset, split, "gpt2", cache_dir=str(tmp_path), log=_quiet,
                              text_column="body", threads=1)
    np.testing.assert_array_equal(tokens, _expected(docs[split]))
  with pytest.raises(ConfigError, match=r"^text_column: 'text' is not a column of hf:.*: id, body$"):
    data.load_tokens(dataset, "train", "gpt2", cache_dir=str(tmp_path / "b"), log=_quiet)
  with pytest.raises(ConfigError, match=r"^dataset: cannot load split 'dev' of .*hf_splits"):
    data.load_tokens(dataset, "valid", "gpt2", cache_dir=str(tmp_path / "c"), log=_quiet,
                     text_column="body", hf_splits="train,dev,test")


def test_max_samples_keeps_the_first_documents(folders, docs, tmp_path):
  tokens = data.load_tokens(folders["parquet"], "train", "gpt2", 33, str(tmp_path), _quiet)
  np.testing.assert_array_equal(tokens, _expected(docs["train"][:33]))


def test_bad_documents_are_one_line_naming_file_and_line(tmp_path):
  folder = tmp_path / "bad"
  folder.mkdir()
  for split in data.SPLITS:
    _write_jsonl(folder / f"{split}.jsonl", ["fine"])
  with open(folder / "train.jsonl", "a") as f:
    f.write('\n{"text": "ok"}\n{"text": 3}\n')  # a blank line is no document
  with pytest.raises(ConfigError, match=rf"^dataset: {folder}/train.jsonl line 4 has a int in "
                                        r"'text', not text; a .jsonl file holds"):
    data.load_tokens(str(folder), "train", "gpt2", cache_dir=str(tmp_path / "c"), log=_quiet)
  (folder / "test.jsonl").write_text("{not json\n")
  with pytest.raises(ConfigError, match=rf"^dataset: {folder}/test.jsonl line 1 is not JSON"):
    data.check_sources(str(folder), "gpt2", str(tmp_path / "c"))
  _write_parquet(folder / "valid.parquet", ["x"], column="content")
  os.remove(folder / "valid.jsonl")
  with pytest.raises(ConfigError, match=r"^text_column: 'text' is not a column of .*valid.parquet; "
                                        r"its columns: content, n$"):
    data.check_sources(str(folder), "gpt2", str(tmp_path / "c"))


# --------------------------------------------------------------------------------- held out


def test_a_single_corpus_holds_out_valid_and_test(tmp_path):
  corpus = tmp_path / "corpus"
  corpus.mkdir()
  documents = _documents(400, 4)
  _write_jsonl(corpus / "a.jsonl", documents[:200])
  _write_jsonl(corpus / "b.jsonl", documents[200:])
  with pytest.raises(ConfigError, match="held_out_fraction > 0 holds valid and test"):
    data.check_sources(str(corpus), "gpt2", str(tmp_path / "cache"))
  data.check_sources(str(corpus), "gpt2", str(tmp_path / "cache"), held_out_fraction=0.1)
  enc = data.get_tokenizer("gpt2")
  logs, seen = [], {}
  for split in data.SPLITS:
    tokens = np.asarray(data.load_tokens(str(corpus), split, "gpt2", cache_dir=str(tmp_path),
                                         log=logs.append, held_out_fraction=0.1))
    cuts = np.flatnonzero(tokens == enc.eot_token)
    seen[split] = [enc.decode(d[d != enc.eot_token].tolist()) for d in np.split(tokens, cuts + 1)[:-1]]
  assert sorted(sum(seen.values(), [])) == sorted(documents)  # each document in exactly one split
  assert 20 <= len(seen["valid"]) <= 60 and 20 <= len(seen["test"]) <= 60
  assert seen["train"] == [d for d in documents if d in seen["train"]]  # in the corpus's order
  assert any("valid with gpt2" in m and "10% of the training text's pieces" in m for m in logs)
  again = []
  data.load_tokens(str(corpus), "test", "gpt2", cache_dir=str(tmp_path), log=again.append,
                   held_out_fraction=0.1)
  assert again == [f"corpus/test: {sum(map(len, map(enc.encode_ordinary, seen['test']))) + len(seen['test']):,} "
                   "tokens, 10% of the training text's pieces (a document, or 2048 lines of a .txt "
                   "file), chosen by a hash of each piece's position"]


# ------------------------------------------------------------- shards, resume, threads, windows


@pytest.fixture
def small_shards(monkeypatch):
  """Shards of ~300 ids and jobs of ~200 characters: a few KB of text make many of each."""
  monkeypatch.setattr(data, "SHARD_TOKENS", 300)
  monkeypatch.setattr(data, "_JOB_CHARS", 200)


def _split_folder(cache) -> str:
  (name,) = [n for n in os.listdir(cache) if n != "hf"]
  return os.path.join(cache, name)


@pytest.mark.parametrize("kind", ["parquet", "hf"])
def test_an_interrupted_preparation_resumes_after_its_last_shard(folders, docs, tmp_path,
                                                                 small_shards, monkeypatch, kind):
  """Interrupted after 30 documents, then run again: the complete shards are kept, reading goes
  on from the last one's end (the hub stream from `datasets`' own state), the ids are the same."""
  dataset, source, options = {
      "parquet": (folders["parquet"], sources.FileSource, {}),
      "hf": (f"hf:{folders['jsonl']}", sources.HubSource, {"text_column": "body"})}[kind]
  whole = data.load_tokens(dataset, "train", "gpt2", cache_dir=str(tmp_path / "ref"), log=_quiet,
                           **options)
  assert len(whole._shards) > 5
  pieces, read = source.pieces, []

  def interrupted_after(n):
    def pieces_until_interrupt(self, start=None, max_rows=0):
      read.append([start, 0])
      for i, piece in enumerate(pieces(self, start, max_rows)):
        if i == n:
          raise KeyboardInterrupt
        read[-1][1] += 1
        yield piece
    return pieces_until_interrupt

  cache = tmp_path / "cache"
  monkeypatch.setattr(source, "pieces", interrupted_after(30))
  with pytest.raises(KeyboardInterrupt):
    data.load_tokens(dataset, "train", "gpt2", cache_dir=str(cache), log=_quiet, **options)
  folder = _split_folder(cache)
  kept = sorted(os.listdir(folder))
  assert "meta.json" not in kept and not [n for n in kept if ".tmp." in n]  # no partial file
  n_kept = len(kept) // 2
  assert kept == [f"{i:05d}{e}" for i in range(n_kept) for e in (".bin", ".json")] and n_kept >= 2
  monkeypatch.setattr(source, "pieces", interrupted_after(10 ** 9))
  logs = []
  resumed = data.load_tokens(dataset, "train", "gpt2", cache_dir=str(cache), log=logs.append,
                             **options)
  np.testing.assert_array_equal(resumed, whole)
  assert data.fingerprint(resumed) == data.fingerprint(whole) == data.fingerprint(np.asarray(whole))
  kept_tokens = sum(len(s) for s in whole._shards[:n_kept])
  assert f"resuming after {kept_tokens:,} tokens in {n_kept} shards" in logs[0]
  start, n_read = read[-1]
  with open(os.path.join(folder, f"{n_kept - 1:05d}.json")) as f:
    assert start == json.load(f)["end"]  # reading went on from the last shard's end ...
  assert 0 < start["rows"] < 30 and n_read == len(docs["train"]) - start["rows"]  # ... and only


def test_a_damaged_shard_is_rebuilt_from_the_one_before(folders, tmp_path, small_shards):
  cache = str(tmp_path)
  whole = np.asarray(data.load_tokens(folders["txt"], "train", "gpt2", cache_dir=cache, log=_quiet))
  folder = _split_folder(cache)
  ids = np.memmap(os.path.join(folder, "00002.bin"), dtype=np.uint16, mode="r+")
  ids[5] += 1
  ids.flush()
  del ids
  logs = []
  again = data.load_tokens(folders["txt"], "train", "gpt2", cache_dir=cache, log=logs.append)
  np.testing.assert_array_equal(again, whole)
  assert logs[0] == (f"token cache {folder}/00002.bin is damaged (its ids differ from the "
                     "fingerprint written with them); rebuilding")
  assert "resuming after" in logs[1] and "in 2 shards" in logs[1]


def test_one_thread_and_many_write_the_same_ids(folders, tmp_path, small_shards):
  fingerprints = {
      threads: data.fingerprint(data.load_tokens(folders["jsonl"], "train", "gpt2", 0,
                                                 str(tmp_path / str(threads)), _quiet,
                                                 threads, text_column="body"))
      for threads in (1, 3)}
  assert fingerprints[1] == fingerprints[3]


def test_windows_and_slices_read_across_shards(folders, tmp_path, small_shards):
  tokens = data.load_tokens(folders["txt"], "train", "gpt2", cache_dir=str(tmp_path), log=_quiet)
  flat = np.asarray(tokens)
  assert len(tokens._shards) > 5 and tokens.dtype == np.uint16 and tokens.shape == flat.shape
  edge = len(tokens._shards[0])
  for key in (slice(edge - 3, edge + 400), slice(-5, None), slice(None, 7), slice(10, 3),
              slice(1, 900, 7)):
    np.testing.assert_array_equal(tokens[key], flat[key])
  assert tokens[edge] == flat[edge] and tokens[-1] == flat[-1]
  with pytest.raises(IndexError):
    tokens[len(flat)]
  sharded, plain = (data.TrainWindows(t, 15, 6, seed=3) for t in (tokens, flat))
  for epoch in (0, 1):
    for index in range(sharded.steps_per_epoch):
      for rows in (slice(None), slice(0, 3), slice(3, 6)):  # each process's share
        np.testing.assert_array_equal(sharded.batch(epoch, index, rows),
                                      plain.batch(epoch, index, rows))


# ------------------------------------------------------------------------------------ prepare


def test_prepare_tokenizes_ahead_and_the_trainer_finds_the_cache(folders, tmp_path, capsys):
  argv = ["prepare", "--dataset", folders["jsonl"], "--text_column", "body",
          "--data_cache_dir", str(tmp_path), "--tokenizer_threads", "2"]
  assert prepare.main(argv) == 0
  out = capsys.readouterr().out
  assert "tokens/s" in out and "MB/s" in out and "2 threads" in out
  for split in data.SPLITS:
    folder = data.cache_folder(folders["jsonl"], split, "gpt2", 0, str(tmp_path),
                               text_column="body")
    assert f"{split}: " in out and f"cached in {folder}" in out and data.is_cached(folder)
  assert prepare.main(argv) == 0
  assert capsys.readouterr().out.count("already cached in") == 3
  with pytest.raises(SystemExit) as e:
    prepare.main(["prepare", "--dataset", folders["jsonl"], "--held_out_fraction", "0.5"])
  assert e.value.code == 2
  assert capsys.readouterr().err.startswith("error: held_out_fraction: 0.5 is not allowed")
