"""Text in, token windows out: tiktoken, the on-disk token cache, epoch order.

The text of a split comes from gptjax.sources (the hub, local folders of .txt/.jsonl/.parquet
files, a held-out fraction). It is tokenized once, on every core, into a folder of flat binary
shards of ids (uint16 when the vocabulary fits, like nanoGPT's `prepare.py`) that an interrupted
preparation resumes, and memory-mapped afterwards. Nothing here knows about the model.
"""
import bisect
import collections
import concurrent.futures
import contextlib
import functools
import hashlib
import json
import operator
import os
import queue
import socket
import tempfile
import threading
import time

import numpy as np
import tiktoken
from tqdm import tqdm

from gptjax import sources
from gptjax.config import FIELDS, SOURCE_FIELDS, TOKENIZERS, ConfigError, dataset_name
from gptjax.sources import SPLITS


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


def source_options(config) -> dict:
  """The options that choose a split's text (load_tokens's, check_sources's), from a config or a
  run's saved config dict; a field it lacks (a run older than the field) takes its default."""
  return {name: config.get(name, FIELDS[name][0]) for name in SOURCE_FIELDS}


def check_sources(dataset: str, tokenizer: str, cache_dir: str = "", max_samples: int = 0,
                  **options) -> None:
  """What loading the data needs, checked without tokenizing or writing anything (`--check_only`):
  each local split's files (UTF-8 text that is not blank, documents with their text column),
  unless the split is in the token cache already; the tokenizer's vocabulary; a cache folder
  that is not a file. Hub datasets are not opened (no network)."""
  options = {**source_options({}), **options}
  for split in SPLITS:
    if not is_cached(cache_folder(dataset, split, tokenizer, max_samples, cache_dir, **options)):
      sources.check_split(dataset, split, options["text_column"], options["held_out_fraction"])
  get_tokenizer(tokenizer)
  check_cache_dir(cache_dir)


def cache_key(dataset: str, split: str, tokenizer: str, max_samples: int, **options) -> str:
  """The name of a split's cache folder: the dataset's name, split, tokenizer, max_samples, and a
  hash of sources.split_identity (a local file's path, size and modification time)."""
  identity = sources.split_identity(dataset, split, **{**source_options({}), **options})
  digest = hashlib.sha1(identity.encode()).hexdigest()[:10]
  limit = max_samples if split == "train" else 0
  return f"{dataset_name(dataset)}-{split}-{tokenizer}-n{limit}-{digest}"


def cache_folder(dataset: str, split: str, tokenizer: str, max_samples: int = 0,
                 cache_dir: str = "", **options) -> str:
  """The folder of a split's token cache (see cache_key), under `cache_dir` or the default."""
  return os.path.join(cache_dir or default_cache_dir(),
                      cache_key(dataset, split, tokenizer, max_samples, **options))


def is_cached(folder: str) -> bool:
  """Whether the cache folder holds a complete split (meta.json is written last)."""
  return os.path.exists(os.path.join(folder, _META))


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


# ------------------------------------------------------------------------------- the token cache
#
# A split's cache is a folder: shards 00000.bin, 00001.bin, ... of SHARD_TOKENS ids or a little
# more (flat uint16/uint32, nanoGPT's format), each with a JSON file written after it: its length,
# the sha256 of its ids and the source position where it ends. meta.json, written last, says the
# split is complete (its length, dtype, tokenizer and fingerprint). An interrupted preparation
# keeps its complete shards and continues from the last one's end; a damaged shard is rebuilt
# from the shard before it.

SHARD_TOKENS = 1 << 26  # 64M ids, 128 MB as uint16: what an interruption can cost
_JOB_CHARS = 1 << 20    # text per tokenizing job: enough to keep a thread busy ~50 ms
_BLOCK = 1 << 22        # ids a read while checking a shard
_META = "meta.json"


class DamagedCache(Exception):
  """A token cache file that fails its checks; load_tokens rebuilds it (and the shards after it).
  `path` names the file."""

  def __init__(self, path: str, reason: str):
    super().__init__(reason)
    self.path = path


class Tokens:
  """A split's ids as one 1-D array over its shards' memory maps: len, an index, a slice (a view
  within one shard, a copy across two), np.asarray; `fingerprint` as written with them."""

  def __init__(self, shards: list[np.ndarray], fingerprint: str):
    self._shards = shards
    self._starts = np.cumsum([0] + [len(s) for s in shards]).tolist()
    self.dtype = shards[0].dtype
    self.fingerprint = fingerprint

  def __len__(self) -> int:
    return self._starts[-1]

  @property
  def shape(self) -> tuple:
    return (len(self),)

  def _range(self, start: int, stop: int) -> np.ndarray:
    shard = bisect.bisect_right(self._starts, start) - 1
    parts = []
    while start < stop:
      offset = self._starts[shard]
      part = self._shards[shard][start - offset:stop - offset]
      parts.append(part)
      start += len(part)
      shard += 1
    if len(parts) == 1:
      return parts[0]
    return np.concatenate(parts) if parts else np.empty(0, self.dtype)

  def __getitem__(self, key):
    if isinstance(key, slice):
      start, stop, step = key.indices(len(self))
      return self._range(start, max(start, stop)) if step == 1 else np.asarray(self)[key]
    index = operator.index(key)
    if not -len(self) <= index < len(self):
      raise IndexError(f"index {index} is out of bounds for {len(self)} tokens")
    index %= len(self)
    shard = bisect.bisect_right(self._starts, index) - 1
    return self._shards[shard][index - self._starts[shard]]

  def __array__(self, dtype=None, copy=None):
    return np.asarray(self._range(0, len(self)), dtype=dtype)


def load_tokens(dataset: str, split: str, tokenizer: str, max_samples: int = 0,
                cache_dir: str = "", log=print, threads: int = 0, **options) -> Tokens:
  """Token ids of a split, tokenized once (on `threads` threads, 0: every core) and memory-mapped
  from the cache afterwards; a cache that fails its checks (see _check_shard) is rebuilt from its
  last good shard. `options`: source_options()."""
  options = {**source_options({}), **options}
  folder = cache_folder(dataset, split, tokenizer, max_samples, cache_dir, **options)
  if is_cached(folder):
    try:
      tokens = _open_cache(folder, tokenizer)
      if options["held_out_fraction"]:
        log(f"{dataset_name(dataset)}/{split}: {len(tokens):,} tokens, "
            f"{sources.held_out_statement(split, options['held_out_fraction'])}")
      return tokens
    except DamagedCache as e:
      log(f"token cache {e.path} is damaged ({e}); rebuilding")
      with contextlib.suppress(FileNotFoundError):  # another process rebuilding it too
        os.remove(os.path.join(folder, _META))
  check_cache_dir(cache_dir, create=True)
  source = sources.open_split(dataset, split, hf_cache_dir=os.path.join(
      cache_dir or default_cache_dir(), "hf"), **options)
  _tokenize_to_cache(source, f"{dataset_name(dataset)}/{split}", folder, tokenizer,
                     max_samples if split == "train" else 0, threads, log)
  for ext in (".bin", ".json"):  # the single file this split was cached in before issue 24
    with contextlib.suppress(FileNotFoundError):
      os.remove(folder + ext)
  return _open_cache(folder, tokenizer, check=False)


def _shard_paths(folder: str, index: int) -> tuple[str, str]:
  return tuple(os.path.join(folder, f"{index:05d}{ext}") for ext in (".bin", ".json"))


def _read_json(path: str) -> dict:
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise DamagedCache(path, f"{os.path.basename(path)} does not read ({type(e).__name__})") from None


def _write_json(path: str, value: dict) -> None:
  with open(_tmp_name(path), "w") as f:
    json.dump(value, f)
  os.replace(_tmp_name(path), path)


def _tmp_name(path: str) -> str:
  """A file being written: its host and process in its name, so that a second process preparing
  the same split (another host on a shared folder) writes its own, and a dead one's is known."""
  return f"{path}.tmp.{socket.gethostname()}.{os.getpid()}"


def _remove_dead_tmp_files(folder: str) -> None:
  host = socket.gethostname()
  for name in os.listdir(folder):
    _, tmp, rest = name.partition(".tmp.")
    file_host, _, pid = rest.rpartition(".")
    if tmp and file_host == host and pid.isdigit() and not _alive(int(pid)):
      with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(folder, name))


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    pass
  return True


def _check_shard(folder: str, index: int, dtype, n_vocab: int, tokenizer: str, split_digest=None):
  """Shard `index`'s meta dict, after the checks a damaged or cut shard fails: its meta reads,
  its file has the length the meta gives, every id is inside the vocabulary, and the ids' sha256
  is the one written with them. Read in blocks, not mapped: memory stays flat. `split_digest`,
  when given, is fed the ids too. Raises DamagedCache saying which check failed."""
  bin_path, meta_path = _shard_paths(folder, index)
  try:
    meta = _read_json(meta_path)
    n_tokens, expected = int(meta["n_tokens"]), meta.get("fingerprint")
  except (KeyError, TypeError, ValueError) as e:
    raise DamagedCache(bin_path, f"{os.path.basename(meta_path)} does not read "
                                 f"({type(e).__name__})") from None
  except DamagedCache as e:
    raise DamagedCache(bin_path, str(e)) from None
  if not os.path.isfile(bin_path):
    raise DamagedCache(bin_path, f"{os.path.basename(bin_path)} is missing")
  size = os.path.getsize(bin_path)
  if n_tokens <= 0 or size != n_tokens * np.dtype(dtype).itemsize:
    raise DamagedCache(bin_path, f"{size:,} bytes where {os.path.basename(meta_path)} says "
                                 f"{n_tokens:,} {np.dtype(dtype).name} ids")
  digest, top = hashlib.sha256(), 0
  digests = (digest,) if split_digest is None else (digest, split_digest)
  with open(bin_path, "rb") as f:
    while (block := np.fromfile(f, dtype, _BLOCK)).size:
      top = max(top, int(block.max()))
      for d in digests:
        d.update(block)
  if top >= n_vocab:
    raise DamagedCache(bin_path, f"id {top} is outside {tokenizer}'s {n_vocab} ids")
  if f"sha256:{digest.hexdigest()}" != expected:
    raise DamagedCache(bin_path, "its ids differ from the fingerprint written with them")
  return meta


def _open_cache(folder: str, tokenizer: str, check: bool = True) -> Tokens:
  """The split's shards, memory-mapped; with `check`, each first passes _check_shard (on every
  core: WikiText-103's 240 MB in ~0.2 s). Raises DamagedCache naming the file that failed."""
  meta_path = os.path.join(folder, _META)
  meta = _read_json(meta_path)
  try:
    dtype, n_vocab, sizes = np.dtype(meta["dtype"]), int(meta["n_vocab"]), meta["shards"]
    fingerprint = meta["fingerprint"]
    if sum(sizes) != int(meta["n_tokens"]) or not sizes:
      raise ValueError
  except (KeyError, TypeError, ValueError) as e:
    raise DamagedCache(meta_path, f"{_META} does not read ({type(e).__name__})") from None
  if meta.get("tokenizer") != tokenizer:
    raise DamagedCache(meta_path, f"{_META} names tokenizer {meta.get('tokenizer')!r}")
  if check:
    with concurrent.futures.ThreadPoolExecutor(_cores()) as pool:
      metas = list(pool.map(lambda i: _check_shard(folder, i, dtype, n_vocab, tokenizer),
                            range(len(sizes))))
    if [m["n_tokens"] for m in metas] != sizes:
      raise DamagedCache(meta_path, f"its shards' lengths differ from {_META}'s")
  shards = []
  for index, n_tokens in enumerate(sizes):
    bin_path = _shard_paths(folder, index)[0]
    if not os.path.isfile(bin_path) or os.path.getsize(bin_path) != n_tokens * dtype.itemsize:
      raise DamagedCache(bin_path, f"{os.path.basename(bin_path)} is not the {n_tokens:,} ids "
                                   f"{_META} says")
    shards.append(np.memmap(bin_path, dtype=dtype, mode="r", shape=(n_tokens,)))
  return Tokens(shards, fingerprint)


def _cores() -> int:
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def _resume_point(folder: str, dtype, n_vocab: int, tokenizer: str):
  """(the metas of the shards a preparation keeps, the running sha256 of their ids): the
  complete, undamaged shards from the first on. The first that is not, and the ones after it,
  are written anew (renamed over: another process preparing the same split into the same
  folder writes the same bytes)."""
  split_digest, kept = hashlib.sha256(), []
  while os.path.exists(_shard_paths(folder, len(kept))[1]):
    candidate = split_digest.copy()
    try:
      meta = _check_shard(folder, len(kept), dtype, n_vocab, tokenizer, candidate)
    except DamagedCache:
      break
    split_digest = candidate
    kept.append(meta)
  return kept, split_digest


def _encode(enc: tiktoken.Encoding, texts: list[str], eots: list[bool], dtype):
  """(the ids of `texts`, an end-of-text after those marked, as `dtype`; the UTF-8 bytes read).
  tiktoken's Rust code runs without the GIL: jobs on a thread pool use every core."""
  parts, n_bytes = [], 0
  eot = np.array([enc.eot_token], np.uint32)
  for text, ends in zip(texts, eots):
    try:  # encode(disallowed_special=()) is encode_ordinary; _to_numpy skips a Python list
      parts.append(enc.encode_to_numpy(text, disallowed_special=()))
    except UnicodeEncodeError:  # a lone surrogate (JSON allows them): encode_ordinary's repair
      parts.append(np.asarray(enc.encode_ordinary(text), np.uint32))
    n_bytes += len(text.encode("utf-8", "surrogatepass"))
    if ends:
      parts.append(eot)
  return np.concatenate(parts).astype(dtype), n_bytes


def _jobs(pieces):
  """Pieces grouped into (texts, end-of-text flags, position after the last) of ~_JOB_CHARS; the
  position is asked for as soon as the job's last piece is read, before the source moves on."""
  texts, eots, size = [], [], 0
  for piece in pieces:
    texts.append(piece.text)
    eots.append(piece.ends_doc)
    size += len(piece.text)
    if size >= _JOB_CHARS:
      yield texts, eots, piece.position()
      texts, eots, size = [], [], 0
  if texts:
    yield texts, eots, piece.position()


def _tokenize_to_cache(source, name: str, folder: str, tokenizer: str, max_rows: int,
                       threads: int, log) -> None:
  enc = get_tokenizer(tokenizer)
  dtype = token_dtype(enc.n_vocab)
  threads = threads or _cores()
  os.makedirs(folder, exist_ok=True)
  _remove_dead_tmp_files(folder)
  shards, split_digest = _resume_point(folder, dtype, enc.n_vocab, tokenizer)
  resumed = sum(s["n_tokens"] for s in shards)
  log(f"Tokenizing {name} with {tokenizer} on {threads} threads: {source.description}"
      + (f"; resuming after {resumed:,} tokens in {len(shards)} shards" if shards else "") + "...")
  started, n_tokens, n_bytes = time.perf_counter(), 0, 0
  shard = _ShardWriter(folder, len(shards))
  try:
    with concurrent.futures.ThreadPoolExecutor(threads) as pool, \
        tqdm(unit="tok", unit_scale=True, desc=f"tokenize {name}", disable=None,
             leave=False) as bar:
      pending = collections.deque()

      def write_oldest():
        nonlocal n_tokens, n_bytes, shard
        done, end = pending.popleft()
        ids, text_bytes = done.result()
        shard.write(ids)
        split_digest.update(ids)
        n_tokens, n_bytes = n_tokens + len(ids), n_bytes + text_bytes
        bar.update(len(ids))
        bar.set_postfix_str(f"{n_bytes / 1e6 / (time.perf_counter() - started):.1f} MB/s",
                            refresh=False)
        if shard.n_tokens >= SHARD_TOKENS:
          shards.append(shard.close(end))
          shard = _ShardWriter(folder, len(shards))

      end = shards[-1]["end"] if shards else None
      for texts, eots, end in _jobs(source.pieces(end, max_rows)):
        pending.append((pool.submit(_encode, enc, texts, eots, dtype), end))
        if len(pending) > 2 * threads:  # a bounded queue: memory stays flat
          write_oldest()
      while pending:
        write_oldest()
      if shard.n_tokens:
        shards.append(shard.close(end))
  finally:
    shard.discard()
  if not shards:
    raise ConfigError(f"dataset: the {name} split holds no text ({source.description})"
                      + ("; raise held_out_fraction" if isinstance(source, sources.HeldOut) else ""))
  seconds = time.perf_counter() - started
  _write_json(os.path.join(folder, _META), {
      "dtype": np.dtype(dtype).name, "n_tokens": sum(s["n_tokens"] for s in shards),
      "shards": [s["n_tokens"] for s in shards], "tokenizer": tokenizer, "n_vocab": enc.n_vocab,
      "dataset": name, "source": source.description,
      "fingerprint": f"sha256:{split_digest.hexdigest()}"})
  log(f"Tokenized {name}: {n_tokens:,} tokens from {n_bytes / 1e6:,.1f} MB of text in "
      f"{seconds:.1f} s ({n_tokens / seconds:,.0f} tokens/s, {n_bytes / 1e6 / seconds:.1f} MB/s, "
      f"{threads} threads); {len(shards)} shard(s) in {folder}")


class _ShardWriter:
  """One shard being written: ids appended to a temporary file, renamed when it closes; its meta
  file (length, sha256, the source position where it ends) after it."""

  def __init__(self, folder: str, index: int):
    self.bin_path, self.meta_path = _shard_paths(folder, index)
    self.file, self.n_tokens, self.digest = None, 0, hashlib.sha256()

  def write(self, ids: np.ndarray) -> None:
    if self.file is None:
      self.file = open(_tmp_name(self.bin_path), "wb")
    ids.tofile(self.file)
    self.digest.update(ids)
    self.n_tokens += len(ids)

  def close(self, end: dict) -> dict:
    self.file.close()
    self.file = None
    os.replace(_tmp_name(self.bin_path), self.bin_path)
    meta = {"n_tokens": self.n_tokens, "fingerprint": f"sha256:{self.digest.hexdigest()}",
            "end": end}
    _write_json(self.meta_path, meta)
    return meta

  def discard(self) -> None:
    """A shard left open (a failure, a signal): no partial file stays behind."""
    if self.file is not None:
      self.file.close()
      os.remove(_tmp_name(self.bin_path))


def fingerprint(tokens) -> str:
  """'sha256:<hex>' of a split's token ids as stored: the identity of the data a run trains on.
  A cached split's was computed as it was written."""
  if isinstance(tokens, Tokens):
    return tokens.fingerprint
  digest = hashlib.sha256()
  flat = np.asarray(tokens).reshape(-1)
  for start in range(0, len(flat), 1 << 24):  # 16M ids a slice: bounded memory for any size
    digest.update(np.ascontiguousarray(flat[start:start + (1 << 24)]).tobytes())
  return f"sha256:{digest.hexdigest()}"


class TrainWindows:
  """Shuffled, non-overlapping windows of `seq_len + 1` tokens; the order depends on (seed, epoch).

  A batch is addressed by (epoch, index) alone, so the data position of a run is two integers.
  The tokens may be a Tokens over many shards: a window is read where it lies, across a shard
  boundary too. The epoch's order is one permutation of the windows, 4 bytes a window (int32,
  the same order as NumPy's int64 `permutation`): a 10B-token corpus at max_seq_len 1024 needs
  39 MB, at 256 156 MB.
  """

  def __init__(self, tokens, seq_len: int, batch_size: int, seed: int):
    self.window = seq_len + 1
    self.n_windows = len(tokens) // self.window
    if self.n_windows < batch_size:
      raise ConfigError(
          f"batch_size: {batch_size} windows of max_seq_len+1={self.window} tokens need "
          f"{batch_size * self.window:,} training tokens, the split has {len(tokens):,}; "
          "lower batch_size or max_seq_len")
    self.tokens = tokens
    self.batch_size = batch_size
    self.seed = seed
    self.steps_per_epoch = self.n_windows // batch_size
    self._perm_epoch, self._perm = None, None

  def order(self, epoch: int) -> np.ndarray:
    if self._perm_epoch != epoch:
      self._perm = np.arange(self.n_windows,
                             dtype=np.int32 if self.n_windows < 2 ** 31 else np.int64)
      np.random.default_rng([self.seed, epoch]).shuffle(self._perm)
      self._perm_epoch = epoch
    return self._perm

  def batch(self, epoch: int, index: int, rows: slice = slice(None)) -> np.ndarray:
    """Batch `index` of `epoch` as int32 (B, seq_len+1); `rows` picks this process's share."""
    idx = self.order(epoch)[index * self.batch_size:(index + 1) * self.batch_size][rows]
    out = np.empty((len(idx), self.window), np.int32)
    for row, window in enumerate(idx.tolist()):
      out[row] = self.tokens[window * self.window:(window + 1) * self.window]
    return out

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
