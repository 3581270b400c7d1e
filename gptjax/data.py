"""Text in, token windows out: hub/local loading, tiktoken, the on-disk token cache, epoch order.

Both the Hugging Face hub datasets (WikiText-2/103) and local folders of `.txt` files are loaded
through HF `datasets` (the `text` builder for folders), so everything after loading is one path.
Each split is tokenized once into a flat binary file of ids (uint16 when the vocabulary fits,
like nanoGPT's `prepare.py`) and memory-mapped afterwards. Nothing here knows about the model.
"""
import functools
import hashlib
import json
import os
import queue
import threading

import numpy as np
import tiktoken
from tqdm import tqdm

from gptjax.config import HUB_DATASETS, TOKENIZERS, ConfigError, dataset_name

SPLITS = ("train", "valid", "test")
_HUB_SPLIT = {"train": "train", "valid": "validation", "test": "test"}
_ROWS_PER_CHUNK = 2048


# GPT-2's vocabulary as openai/gpt-2 published it, shipped in the package (assets/gpt2/README.md),
# with the sha256 that tiktoken pins for these two files (tiktoken_ext/openai_public.py, gpt2).
GPT2_VOCAB_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "gpt2")
GPT2_VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
GPT2_ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"


@functools.cache
def _embedded_gpt2() -> tiktoken.Encoding:
  """tiktoken's gpt2 encoding built from the embedded files: no network, no cache directory."""
  import tiktoken.load
  from tiktoken_ext import openai_public

  saved = os.environ.get("TIKTOKEN_CACHE_DIR")
  # '' turns tiktoken's file cache off: it would copy the local files into it (and raise where a
  # TIKTOKEN_CACHE_DIR is read-only).
  os.environ["TIKTOKEN_CACHE_DIR"] = ""
  try:
    ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=os.path.join(GPT2_VOCAB_DIR, "vocab.bpe"),
        encoder_json_file=os.path.join(GPT2_VOCAB_DIR, "encoder.json"),
        vocab_bpe_hash=GPT2_VOCAB_BPE_SHA256, encoder_json_hash=GPT2_ENCODER_JSON_SHA256)
  finally:
    if saved is None:
      del os.environ["TIKTOKEN_CACHE_DIR"]
    else:
      os.environ["TIKTOKEN_CACHE_DIR"] = saved
  return tiktoken.Encoding(name="gpt2", pat_str=openai_public.r50k_pat_str, mergeable_ranks=ranks,
                           special_tokens={openai_public.ENDOFTEXT: 50256}, explicit_n_vocab=50257)


def get_tokenizer(name: str) -> tiktoken.Encoding:
  """The tiktoken encoding of a TOKENIZERS name: gpt2 from the package's own files, the others
  through tiktoken (downloaded once, or found in TIKTOKEN_CACHE_DIR)."""
  if name not in TOKENIZERS:
    raise ConfigError(f"tokenizer: unknown tokenizer {name!r}; allowed: {', '.join(TOKENIZERS)}")
  if name == "gpt2":
    return _embedded_gpt2()
  try:
    return tiktoken.get_encoding(TOKENIZERS[name])
  except Exception as e:  # tiktoken fetches its vocabulary over the network when not cached
    raise ConfigError(
        f"tokenizer: cannot load the {TOKENIZERS[name]} vocabulary ({type(e).__name__}); offline, "
        "set TIKTOKEN_CACHE_DIR to a folder holding tiktoken's cache files, or use --tokenizer gpt2 "
        "(shipped with gptjax)") from None


def token_dtype(n_vocab: int):
  return np.uint16 if n_vocab <= np.iinfo(np.uint16).max + 1 else np.uint32


def local_split_path(folder: str, split: str) -> str | None:
  names = ["valid.txt", "validation.txt"] if split == "valid" else [f"{split}.txt"]
  for name in names:
    path = os.path.join(folder, name)
    if os.path.isfile(path):
      return path
  return None


def load_text_rows(dataset: str, split: str):
  """The split as a HF `datasets.Dataset` with one `text` column (lines with their newlines)."""
  import datasets  # slow to import; only needed when a split is not cached yet

  datasets.disable_progress_bars()
  if dataset in HUB_DATASETS:
    try:
      return datasets.load_dataset("Salesforce/wikitext", HUB_DATASETS[dataset],
                                   split=_HUB_SPLIT[split])
    except Exception as e:
      raise ConfigError(
          f"dataset: cannot load {dataset!r} from the Hugging Face Hub ({type(e).__name__}); "
          "offline, point --dataset at a local folder with train.txt, valid.txt and test.txt "
          "(e.g. --dataset ../shared/data/wikitext-2-local)") from None
  path = local_split_path(dataset, split)
  if path is None:
    raise ConfigError(f"dataset: folder {dataset!r} has no {split}.txt"
                      + (" (or validation.txt)" if split == "valid" else ""))
  return datasets.load_dataset("text", data_files={split: path}, split=split,
                               keep_linebreaks=True)


def cache_key(dataset: str, split: str, tokenizer: str, max_samples: int) -> str:
  source = dataset
  if dataset not in HUB_DATASETS:  # a local file: its identity is its path, size and mtime
    path = local_split_path(dataset, split) or ""
    st = os.stat(path) if path else None
    source = f"{os.path.abspath(path)}:{st and st.st_size}:{st and st.st_mtime_ns}"
  digest = hashlib.sha1(source.encode()).hexdigest()[:10]
  limit = max_samples if split == "train" else 0
  return f"{dataset_name(dataset)}-{split}-{tokenizer}-n{limit}-{digest}"


def default_cache_dir() -> str:
  return os.environ.get("GPTJAX_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "gptjax"))


def load_tokens(dataset: str, split: str, tokenizer: str, max_samples: int = 0,
                cache_dir: str = "", log=print) -> np.ndarray:
  """Token ids of a split, tokenized once and memory-mapped from the cache afterwards."""
  cache_dir = cache_dir or default_cache_dir()
  key = cache_key(dataset, split, tokenizer, max_samples)
  bin_path, meta_path = (os.path.join(cache_dir, key + ext) for ext in (".bin", ".json"))
  if not os.path.exists(meta_path):  # the meta file is written last: its presence means complete
    _tokenize_to_cache(dataset, split, tokenizer, max_samples, bin_path, meta_path, log)
  with open(meta_path) as f:
    meta = json.load(f)
  return np.memmap(bin_path, dtype=np.dtype(meta["dtype"]), mode="r", shape=(meta["n_tokens"],))


def _tokenize_to_cache(dataset, split, tokenizer, max_samples, bin_path, meta_path, log):
  enc = get_tokenizer(tokenizer)
  rows = load_text_rows(dataset, split)
  if split == "train" and max_samples:
    rows = rows.select(range(min(max_samples, len(rows))))
  dtype = token_dtype(enc.n_vocab)
  os.makedirs(os.path.dirname(bin_path), exist_ok=True)
  tmp_path = f"{bin_path}.tmp{os.getpid()}"
  n_tokens = 0
  log(f"Tokenizing {dataset_name(dataset)}/{split} with {tokenizer} ({len(rows):,} lines)...")
  with open(tmp_path, "wb") as out, tqdm(total=len(rows), unit="line", desc=f"tokenize {split}",
                                         disable=None, leave=False) as bar:
    # Chunks of whole lines keep memory bounded (WikiText-103 is ~120M tokens).
    for start in range(0, len(rows), _ROWS_PER_CHUNK):
      texts = rows[start:start + _ROWS_PER_CHUNK]["text"]
      ids = enc.encode_ordinary("".join(texts))
      if start + _ROWS_PER_CHUNK >= len(rows):
        ids.append(enc.eot_token)  # one end-of-text closes the split
      np.asarray(ids, dtype=dtype).tofile(out)
      n_tokens += len(ids)
      bar.update(len(texts))
  os.replace(tmp_path, bin_path)
  with open(meta_path + ".tmp", "w") as f:
    json.dump({"dtype": np.dtype(dtype).name, "n_tokens": n_tokens, "tokenizer": tokenizer,
               "n_vocab": enc.n_vocab, "dataset": dataset, "split": split}, f)
  os.replace(meta_path + ".tmp", meta_path)


def fingerprint(tokens: np.ndarray) -> str:
  """'sha256:<hex>' of a split's token ids as stored: the identity of the data a run trains on."""
  digest = hashlib.sha256()
  flat = np.asarray(tokens).reshape(-1)
  for start in range(0, len(flat), 1 << 24):  # 16M ids a slice: bounded memory for any size
    digest.update(np.ascontiguousarray(flat[start:start + (1 << 24)]).tobytes())
  return f"sha256:{digest.hexdigest()}"


class TrainWindows:
  """Shuffled, non-overlapping windows of `seq_len + 1` tokens; the order depends on (seed, epoch).

  A batch is addressed by (epoch, index) alone, so the data position of a run is two integers.
  """

  def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, seed: int):
    self.window = seq_len + 1
    self.n_windows = len(tokens) // self.window
    if self.n_windows < batch_size:
      raise ConfigError(
          f"batch_size: {batch_size} windows of max_seq_len+1={self.window} tokens need "
          f"{batch_size * self.window:,} training tokens, the split has {len(tokens):,}; "
          "lower batch_size or max_seq_len")
    self.windows = tokens[:self.n_windows * self.window].reshape(self.n_windows, self.window)
    self.batch_size = batch_size
    self.seed = seed
    self.steps_per_epoch = self.n_windows // batch_size
    self._perm_epoch, self._perm = None, None

  def order(self, epoch: int) -> np.ndarray:
    if self._perm_epoch != epoch:
      self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.n_windows)
      self._perm_epoch = epoch
    return self._perm

  def batch(self, epoch: int, index: int, rows: slice = slice(None)) -> np.ndarray:
    """Batch `index` of `epoch` as int32 (B, seq_len+1); `rows` picks this process's share."""
    idx = self.order(epoch)[index * self.batch_size:(index + 1) * self.batch_size][rows]
    return np.asarray(self.windows[idx], dtype=np.int32)

  def epoch(self, epoch: int, start: int = 0, rows: slice = slice(None)):
    for index in range(start, self.steps_per_epoch):
      yield self.batch(epoch, index, rows)


def eval_batches(tokens: np.ndarray, seq_len: int, batch_size: int):
  """The whole split in order: every token after the first is predicted exactly once.

  Yields (inputs, targets, weights), each (batch_size, seq_len); the tail is padded with weight 0
  so that every batch has the same shape (one compilation).
  """
  n = len(tokens) - 1
  starts = np.arange(0, n, seq_len)
  for b in range(0, len(starts), batch_size):
    inputs = np.zeros((batch_size, seq_len), np.int32)
    targets = np.zeros((batch_size, seq_len), np.int32)
    weights = np.zeros((batch_size, seq_len), np.float32)
    for row, s in enumerate(starts[b:b + batch_size]):
      length = min(seq_len, n - s)
      inputs[row, :length] = tokens[s:s + length]
      targets[row, :length] = tokens[s + 1:s + 1 + length]
      weights[row, :length] = 1.0
    yield inputs, targets, weights


def prefetch(iterator, put, size: int = 2):
  """Runs `put` (host-to-device copy) on a background thread, `size` batches ahead."""
  q = queue.Queue(maxsize=size)
  done = object()
  error = []

  def worker():
    try:
      for item in iterator:
        q.put(put(item))
    except BaseException as e:  # re-raised in the consumer
      error.append(e)
    finally:
      q.put(done)

  threading.Thread(target=worker, daemon=True).start()
  while (item := q.get()) is not done:
    yield item
  if error:
    raise error[0]
