"""Text in, token windows out: hub/local loading, tiktoken, the on-disk token cache, epoch order.

Both the Hugging Face hub datasets (WikiText-2/103) and local folders of `.txt` files are loaded
through HF `datasets` (the `text` builder for folders), so everything after loading is one path.
Each split is tokenized once into a flat binary file of ids (uint16 when the vocabulary fits,
like nanoGPT's `prepare.py`) and memory-mapped afterwards. Nothing here knows about the model.
"""
import codecs
import contextlib
import functools
import hashlib
import json
import os
import queue
import socket
import tempfile
import threading

import numpy as np
import tiktoken
from tqdm import tqdm

from gptjax.config import HUB_DATASETS, SAMPLE_DIR, TOKENIZERS, ConfigError, dataset_name

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
        "set TIKTOKEN_CACHE_DIR to a folder holding tiktoken's cache files, or use --tokenizer "
        "gpt2 (shipped with gptjax)") from None


def token_dtype(n_vocab: int):
  return np.uint16 if n_vocab <= np.iinfo(np.uint16).max + 1 else np.uint32


def local_split_path(folder: str, split: str) -> str | None:
  names = ["valid.txt", "validation.txt"] if split == "valid" else [f"{split}.txt"]
  for name in names:
    path = os.path.join(folder, name)
    if os.path.isfile(path):
      return path
  return None


def local_split_file(folder: str, split: str) -> str:
  """local_split_path, or a ConfigError naming the folder and the file it lacks."""
  path = local_split_path(folder, split)
  if path is None:
    raise ConfigError(f"dataset: folder {folder!r} has no {split}.txt"
                      + (" (or validation.txt)" if split == "valid" else "")
                      + "; a dataset folder holds train.txt, valid.txt (or validation.txt) "
                      "and test.txt")
  return path


def check_split_file(path: str) -> None:
  """ConfigError unless `path` is UTF-8 text that is not blank: HF `datasets` fails on either
  with a traceback, and a blank split would train or evaluate on nothing."""
  allowed = "a split file must be UTF-8 text with at least one non-blank line"
  decoder = codecs.getincrementaldecoder("utf-8")()
  offset, has_text = 0, False
  try:
    with open(path, "rb") as f:
      while True:
        block = f.read(1 << 24)
        start = offset - len(decoder.getstate()[0])  # the decoder holds a split character's head
        try:
          decoder.decode(block, final=not block)
        except UnicodeDecodeError as e:
          raise ConfigError(f"dataset: {path} is not UTF-8: byte 0x{e.object[e.start]:02x} at "
                            f"byte offset {start + e.start}; {allowed}") from None
        if not block:
          break
        has_text = has_text or not block.isspace()
        offset += len(block)
  except OSError as e:
    raise ConfigError(f"dataset: cannot read {path} ({e.strerror}); {allowed}") from None
  if not has_text:
    raise ConfigError(f"dataset: {path} is {'blank' if offset else 'empty'} ({offset} bytes); "
                      f"{allowed}")


def check_sources(dataset: str, tokenizer: str, cache_dir: str = "") -> None:
  """What loading the data needs, checked without tokenizing or writing anything (`--check_only`):
  a local folder's three split files, each UTF-8 text that is not blank; the tokenizer's
  vocabulary; a cache folder that is not a file."""
  if dataset not in HUB_DATASETS:
    for split in SPLITS:
      check_split_file(local_split_file(dataset, split))
  get_tokenizer(tokenizer)
  check_cache_dir(cache_dir)


def _hub_unreachable() -> str:
  """Why the Hugging Face Hub cannot be reached ('' when it can, or when that is not ours to
  judge: behind a proxy). A TCP connection within 3 s decides, where HF's client would spend
  ~25 s retrying before it fails."""
  import huggingface_hub.constants
  from urllib.parse import urlparse

  if huggingface_hub.constants.HF_HUB_OFFLINE:
    return "HF_HUB_OFFLINE is set and the dataset is not in HF's cache"
  if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
    return ""
  url = urlparse(huggingface_hub.constants.ENDPOINT)
  try:
    socket.create_connection((url.hostname, url.port or 443), timeout=3).close()
    return ""
  except OSError:
    return f"no connection to {url.hostname}"


@contextlib.contextmanager
def _hub_offline_mode(offline: bool):
  """HF's offline mode for the block (read from the environment when huggingface_hub and datasets
  are imported: set here on their modules)."""
  import datasets
  import huggingface_hub.constants

  modules = (huggingface_hub.constants, datasets.config)
  saved = [m.HF_HUB_OFFLINE for m in modules]
  try:
    for m in modules:
      m.HF_HUB_OFFLINE = m.HF_HUB_OFFLINE or offline
    yield
  finally:
    for m, value in zip(modules, saved):
      m.HF_HUB_OFFLINE = value


def load_text_rows(dataset: str, split: str, cache_dir: str = ""):
  """The split as a HF `datasets.Dataset` with one `text` column (lines with their newlines).
  A folder's split goes through HF's cache under the token cache (`cache_dir`/hf): HF's default,
  ~/.cache/huggingface, may be read-only."""
  import datasets  # slow to import; only needed when a split is not cached yet

  datasets.disable_progress_bars()
  if dataset in HUB_DATASETS:
    unreachable = _hub_unreachable()
    try:
      with _hub_offline_mode(bool(unreachable)):   # offline: HF's own cache, or a quick failure
        return datasets.load_dataset("Salesforce/wikitext", HUB_DATASETS[dataset],
                                     split=_HUB_SPLIT[split])
    except Exception as e:
      raise ConfigError(
          f"dataset: cannot load {dataset!r} from the Hugging Face Hub "
          f"({unreachable or type(e).__name__}); use the WikiText-2 sample shipped with gptjax, "
          f"--dataset {SAMPLE_DIR}, or a local folder of train.txt, valid.txt, test.txt") from None
  path = local_split_file(dataset, split)
  check_split_file(path)
  return datasets.load_dataset("text", data_files={split: path}, split=split, keep_linebreaks=True,
                               cache_dir=os.path.join(cache_dir or default_cache_dir(), "hf"))


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
  return os.environ.get("GPTJAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "gptjax")


def check_cache_dir(cache_dir: str = "", create: bool = False) -> str:
  """The token cache folder (`cache_dir`, else default_cache_dir()); ConfigError naming it and
  what chose it when it is a file or lies under one, or, with `create`, when it cannot be made
  or written (tried by making it and a temporary file in it)."""
  folder = cache_dir or default_cache_dir()
  named = (f"--data_cache_dir {folder}" if cache_dir else
           f"GPTJAX_CACHE={folder}" if os.environ.get("GPTJAX_CACHE") else
           f"the default cache folder {folder}")
  allowed = "point --data_cache_dir or GPTJAX_CACHE at a writable folder"
  existing = os.path.abspath(folder)
  while not os.path.lexists(existing):  # the nearest existing ancestor decides whether mkdir can
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    what = ("is a file, not a folder" if existing == os.path.abspath(folder) else
            f"lies under a file, {existing}")
    raise ConfigError(f"data_cache_dir: {named} {what}; {allowed}")
  if create:
    try:
      os.makedirs(folder, exist_ok=True)
      with tempfile.TemporaryFile(dir=folder):
        pass
    except OSError as e:
      raise ConfigError(f"data_cache_dir: {named} cannot be written ({e.strerror}); "
                        f"{allowed}") from None
  return folder


class DamagedCache(Exception):
  """A token cache file that fails its checks; load_tokens rebuilds it."""


def load_tokens(dataset: str, split: str, tokenizer: str, max_samples: int = 0,
                cache_dir: str = "", log=print) -> np.ndarray:
  """Token ids of a split, tokenized once and memory-mapped from the cache afterwards; a cache
  file that fails its checks (see _open_cache) is rebuilt."""
  folder = cache_dir or default_cache_dir()
  key = cache_key(dataset, split, tokenizer, max_samples)
  bin_path, meta_path = (os.path.join(folder, key + ext) for ext in (".bin", ".json"))
  if os.path.exists(meta_path):  # the meta file is written last: its presence means complete
    try:
      return _open_cache(bin_path, meta_path, tokenizer)
    except DamagedCache as e:
      log(f"token cache {bin_path} is damaged ({e}); rebuilding")
  check_cache_dir(cache_dir, create=True)
  _tokenize_to_cache(dataset, split, tokenizer, max_samples, bin_path, meta_path, log)
  return _open_cache(bin_path, meta_path, tokenizer)


def _open_cache(bin_path: str, meta_path: str, tokenizer: str) -> np.memmap:
  """The cached ids, after checks that cost little next to training (0.3 s for WikiText-103's
  240 MB): the length the meta file gives, every id inside the vocabulary, and the sha256 of
  the ids written with them. Raises DamagedCache saying which failed."""
  try:
    with open(meta_path) as f:
      meta = json.load(f)
    dtype, n_tokens, n_vocab = np.dtype(meta["dtype"]), int(meta["n_tokens"]), int(meta["n_vocab"])
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise DamagedCache(f"{os.path.basename(meta_path)} does not read ({type(e).__name__})") from None
  if meta.get("tokenizer") != tokenizer:
    raise DamagedCache(f"{os.path.basename(meta_path)} names tokenizer {meta.get('tokenizer')!r}")
  if not os.path.isfile(bin_path):
    raise DamagedCache(f"{os.path.basename(bin_path)} is missing")
  size = os.path.getsize(bin_path)
  if n_tokens <= 0 or size != n_tokens * dtype.itemsize:
    raise DamagedCache(f"{size:,} bytes where {os.path.basename(meta_path)} says {n_tokens:,} "
                       f"{dtype.name} ids")
  tokens = np.memmap(bin_path, dtype=dtype, mode="r", shape=(n_tokens,))
  top = int(tokens.max())
  if top >= n_vocab:
    raise DamagedCache(f"id {top} is outside {tokenizer}'s {n_vocab} ids")
  if "fingerprint" in meta and fingerprint(tokens) != meta["fingerprint"]:
    raise DamagedCache("its ids differ from the fingerprint written with them")
  return tokens


def _tokenize_to_cache(dataset, split, tokenizer, max_samples, bin_path, meta_path, log):
  enc = get_tokenizer(tokenizer)
  rows = load_text_rows(dataset, split, os.path.dirname(bin_path))
  if split == "train" and max_samples:
    rows = rows.select(range(min(max_samples, len(rows))))
  dtype = token_dtype(enc.n_vocab)
  tmp_path = f"{bin_path}.tmp{os.getpid()}"
  n_tokens = 0
  digest = hashlib.sha256()  # of the bytes written: fingerprint() of the ids as stored
  log(f"Tokenizing {dataset_name(dataset)}/{split} with {tokenizer} ({len(rows):,} lines)...")
  try:
    with open(tmp_path, "wb") as out, tqdm(total=len(rows), unit="line",
                                           desc=f"tokenize {split}", disable=None,
                                           leave=False) as bar:
      # Chunks of whole lines keep memory bounded (WikiText-103 is ~120M tokens).
      for start in range(0, len(rows), _ROWS_PER_CHUNK):
        texts = rows[start:start + _ROWS_PER_CHUNK]["text"]
        ids = enc.encode_ordinary("".join(texts))
        if start + _ROWS_PER_CHUNK >= len(rows):
          ids.append(enc.eot_token)  # one end-of-text closes the split
        chunk = np.asarray(ids, dtype=dtype)
        digest.update(chunk.tobytes())
        chunk.tofile(out)
        n_tokens += len(ids)
        bar.update(len(texts))
  except BaseException:  # a full disk or a signal: no partial file is left behind
    os.remove(tmp_path)
    raise
  os.replace(tmp_path, bin_path)
  with open(f"{meta_path}.tmp{os.getpid()}", "w") as f:
    json.dump({"dtype": np.dtype(dtype).name, "n_tokens": n_tokens, "tokenizer": tokenizer,
               "n_vocab": enc.n_vocab, "dataset": dataset, "split": split,
               "fingerprint": f"sha256:{digest.hexdigest()}"}, f)
  os.replace(f"{meta_path}.tmp{os.getpid()}", meta_path)


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
