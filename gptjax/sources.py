"""Where a split's text comes from, read as a stream that can stop anywhere and resume.

Three kinds of dataset: the WikiText sets on the Hugging Face Hub (`wikitext`, `wikitext-103`), any
hub dataset with a text column (`hf:NAME[:CONFIG]`, streamed), and a local folder of `.txt`,
`.jsonl` or `.parquet` files per split. A corpus without its own valid and test splits gives them
a held-out fraction of its pieces. A split is read as Pieces: text that is encoded as one string,
whether an end-of-text token follows it, and the position after it, from which reading resumes.
Nothing here tokenizes; memory stays bounded by one piece (or one Arrow batch) whatever the size.
"""
import codecs
import contextlib
import dataclasses
import functools
import hashlib
import itertools
import json
import os
import socket
from typing import Callable

from gptjax.config import HF_PREFIX, HUB_DATASETS, SAMPLE_DIR, ConfigError

SPLITS = ("train", "valid", "test")
FORMATS = (".txt", ".jsonl", ".parquet")
_SPLIT_NAMES = {"train": ("train",), "valid": ("valid", "validation"), "test": ("test",)}
_WIKITEXT_SPLIT = {"train": "train", "valid": "validation", "test": "test"}
# Lines of a .txt file (or rows of WikiText) encoded as one string. The ids of every existing
# cache depend on it: GPT-2's pre-tokenizer joins runs of whitespace across line ends.
LINES_PER_PIECE = 2048
_PARQUET_BATCH = 1024


@dataclasses.dataclass
class Piece:
  text: str
  ends_doc: bool                # an end-of-text token follows it
  position: Callable[[], dict]  # where reading resumes after it (a JSON-able dict), asked at once


# ------------------------------------------------------------------------------ local folders


def _stem_matches(filename: str, name: str) -> bool:
  stem, ext = os.path.splitext(filename)
  return ext in FORMATS and (stem == name or stem.startswith((f"{name}-", f"{name}_", f"{name}.")))


def _data_files_under(folder: str) -> list[str]:
  return sorted(os.path.join(root, f) for root, _, files in os.walk(folder) for f in files
                if f.endswith(FORMATS))


def split_files(folder: str, split: str, held_out: bool = False) -> list[str]:
  """The data files of `split` in `folder`, in reading order: NAME.EXT, NAME-*.EXT (also NAME_*,
  NAME.*) and every data file under a NAME/ subfolder, for the split's names (valid: `valid`,
  else `validation`). With `held_out` the train files, or, without any, every data file of the
  folder: the corpus valid and test are held out of. ConfigError naming what is missing."""
  for name in _SPLIT_NAMES["train" if held_out else split]:
    top = sorted(os.path.join(folder, f) for f in os.listdir(folder)
                 if _stem_matches(f, name) and os.path.isfile(os.path.join(folder, f)))
    files = top + _data_files_under(os.path.join(folder, name))
    if files:
      return files
  if held_out and (files := _data_files_under(folder)):
    return files
  if held_out:
    raise ConfigError(f"dataset: folder {folder!r} holds no .txt, .jsonl or .parquet file; "
                      "held_out_fraction holds valid and test out of a folder of such files")
  names = " or ".join(_SPLIT_NAMES[split])
  raise ConfigError(f"dataset: folder {folder!r} has no {names} files ({split}.txt|.jsonl|.parquet, "
                    f"{split}-*.EXT or {split}/); held_out_fraction > 0 holds valid and test out "
                    "of train")


_TEXT_ALLOWED = "a split file must be UTF-8 text with at least one non-blank line"


def _text_file_state(path: str) -> str:
  """'' when `path` is UTF-8 text that is not blank, else what it is ('blank (5 bytes)');
  ConfigError naming the byte that is not UTF-8, or why the file does not read. Scanned once per
  version of the file: the checks of several splits (held-out ones read the same files) and of
  --check_only and the load after it ask again."""
  try:
    stat = os.stat(path)
  except OSError as e:
    raise ConfigError(f"dataset: cannot read {path} ({e.strerror}); {_TEXT_ALLOWED}") from None
  return _scanned_text_state(path, stat.st_size, stat.st_mtime_ns, stat.st_ino)


@functools.lru_cache(maxsize=1024)
def _scanned_text_state(path: str, *version) -> str:
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
                            f"byte offset {start + e.start}; {_TEXT_ALLOWED}") from None
        if not block:
          break
        has_text = has_text or not block.isspace()
        offset += len(block)
  except OSError as e:
    raise ConfigError(f"dataset: cannot read {path} ({e.strerror}); {_TEXT_ALLOWED}") from None
  return "" if has_text else f"{'blank' if offset else 'empty'} ({offset} bytes)"


def check_split_file(path: str) -> None:
  """ConfigError unless `path` is UTF-8 text that is not blank: a blank split would train or
  evaluate on nothing."""
  if why := _text_file_state(path):
    raise ConfigError(f"dataset: {path} is {why}; {_TEXT_ALLOWED}")


def _jsonl_error(path, line_no, what, text_column):
  return ConfigError(f"dataset: {path} line {line_no} {what}; a .jsonl file holds one JSON "
                     f"object a line, with the text in its {text_column!r} field (--text_column)")


def _parquet_file(path: str, text_column: str):
  import pyarrow.parquet as pq

  try:
    parquet = pq.ParquetFile(path)
  except Exception as e:  # pyarrow's ArrowInvalid / OSError: not a Parquet file
    raise ConfigError(f"dataset: {path} does not read as Parquet ({type(e).__name__}); a "
                      ".parquet file of the dataset holds a text column") from None
  names = parquet.schema_arrow.names
  if text_column not in names:
    raise ConfigError(f"text_column: {text_column!r} is not a column of {path}; its columns: "
                      f"{', '.join(names)}")
  return parquet


def _has_text(path: str, text_column: str) -> bool:
  """Whether `path` holds a document; ConfigError where it does not read as its format says (a
  .jsonl file: its first object, the rest when it is read)."""
  if path.endswith(".txt"):
    return not _text_file_state(path)
  if path.endswith(".parquet"):
    return _parquet_file(path, text_column).metadata.num_rows > 0
  with open(path, encoding="utf-8") as f:
    for line_no, line in enumerate(f, 1):
      if line.strip():
        _jsonl_text(line, path, line_no, text_column)
        return True
  return False


def check_files(files: list[str], text_column: str) -> None:
  """Every file readable as its format says, and at least one of them holding text."""
  if not any([_has_text(path, text_column) for path in files]):  # a list: every file checked
    if len(files) == 1 and files[0].endswith(".txt"):
      check_split_file(files[0])
    raise ConfigError(f"dataset: {files[0]}{' and the other files' if len(files) > 1 else ''} "
                      "hold no text; a split needs at least one non-blank document")


def _jsonl_text(line, path, line_no, text_column) -> str:
  try:
    row = json.loads(line)
  except ValueError as e:
    raise _jsonl_error(path, line_no, f"is not JSON ({getattr(e, 'msg', e)})", text_column) from None
  if not isinstance(row, dict) or text_column not in row:
    raise _jsonl_error(path, line_no, f"has no {text_column!r} field", text_column)
  text = row[text_column]
  if text is not None and not isinstance(text, str):
    raise _jsonl_error(path, line_no, f"has a {type(text).__name__} in {text_column!r}, not text",
                       text_column)
  return text or ""


def _txt_groups(path, skip, text_column):
  """A text file as HF's `text` builder read it for gptjax: universal newlines, every line with
  its '\\n', in groups of LINES_PER_PIECE lines."""
  with open(path, encoding="utf-8") as f:
    lines = itertools.islice(f, skip, None)
    while group := list(itertools.islice(lines, LINES_PER_PIECE)):
      yield group


def _jsonl_groups(path, skip, text_column):
  """Each object of a .jsonl file; blank lines are no documents (rows count objects)."""
  with open(path, encoding="utf-8") as f:
    objects = ((line_no, line) for line_no, line in enumerate(f, 1) if line.strip())
    try:
      for line_no, line in itertools.islice(objects, skip, None):
        yield [_jsonl_text(line, path, line_no, text_column)]
    except UnicodeDecodeError as e:
      raise ConfigError(f"dataset: {path} is not UTF-8 ({e.reason}: byte 0x{e.object[e.start]:02x}"
                        "); a .jsonl file is UTF-8 text") from None


def _parquet_groups(path, skip, text_column):
  parquet = _parquet_file(path, text_column)
  groups = range(parquet.num_row_groups)
  sizes = [parquet.metadata.row_group(g).num_rows for g in groups]
  first = 0
  while first < len(sizes) and skip >= sizes[first]:  # whole row groups are skipped unread
    skip -= sizes[first]
    first += 1
  if first == len(sizes):
    return
  for batch in parquet.iter_batches(_PARQUET_BATCH, row_groups=groups[first:],
                                    columns=[text_column]):
    for text in batch.column(0).to_pylist()[skip:]:
      yield [text or ""]
    skip = 0


_GROUPS = {".txt": _txt_groups, ".jsonl": _jsonl_groups, ".parquet": _parquet_groups}


class FileSource:
  """Files read in order. A .txt file is one document (an end-of-text after it) cut into pieces
  of LINES_PER_PIECE lines; a .jsonl line or .parquet row is one document and one piece.
  Position: file index, rows read of that file, rows read in all."""

  def __init__(self, files: list[str], text_column: str):
    self.files, self.text_column = files, text_column
    self.description = (files[0] if len(files) == 1 else
                        f"{len(files)} files, {files[0]} .. {os.path.basename(files[-1])}")

  def pieces(self, start: dict | None = None, max_rows: int = 0):
    first, skip, total = (start["file"], start["row"], start["rows"]) if start else (0, 0, 0)
    if max_rows and total >= max_rows:
      return
    for index in range(first, len(self.files)):
      path = self.files[index]
      is_txt = path.endswith(".txt")
      row = skip if index == first else 0
      groups = _GROUPS[os.path.splitext(path)[1]](path, row, self.text_column)
      group = next(groups, None)
      while group is not None:
        last = bool(max_rows) and total + len(group) >= max_rows
        group = group[:max_rows - total] if last else group
        upcoming = None if last else next(groups, None)
        row, total = row + len(group), total + len(group)
        yield Piece("".join(group), not is_txt or upcoming is None or last,
                    lambda i=index, r=row, t=total: {"file": i, "row": r, "rows": t})
        if last:
          return
        group = upcoming


# ------------------------------------------------------------------------------------ the hub


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


def load_text_rows(dataset: str, split: str):
  """A WikiText split (`dataset` in HUB_DATASETS) as a HF `datasets.Dataset` with one `text`
  column, a line a row: downloaded once into HF's cache, memory-mapped from it."""
  import datasets  # slow to import; only needed when a split is not cached yet

  datasets.disable_progress_bars()
  unreachable = _hub_unreachable()
  try:
    with _hub_offline_mode(bool(unreachable)):   # offline: HF's own cache, or a quick failure
      return datasets.load_dataset("Salesforce/wikitext", HUB_DATASETS[dataset],
                                   split=_WIKITEXT_SPLIT[split])
  except Exception as e:
    raise ConfigError(
        f"dataset: cannot load {dataset!r} from the Hugging Face Hub "
        f"({unreachable or type(e).__name__}); use the WikiText-2 sample shipped with gptjax, "
        f"--dataset {SAMPLE_DIR}, or a local folder of train.txt, valid.txt, test.txt") from None


class WikiTextSource:
  """A WikiText split: its lines in pieces of LINES_PER_PIECE rows, one end-of-text at the end.
  Position: rows read."""

  def __init__(self, dataset: str, split: str):
    self.rows = load_text_rows(dataset, split)
    self.description = f"{dataset} {_WIKITEXT_SPLIT[split]} ({len(self.rows):,} lines)"

  def pieces(self, start: dict | None = None, max_rows: int = 0):
    end = min(max_rows, len(self.rows)) if max_rows else len(self.rows)
    for first in range((start or {"rows": 0})["rows"], end, LINES_PER_PIECE):
      last = min(first + LINES_PER_PIECE, end)
      yield Piece("".join(self.rows[first:last]["text"]), last == end,
                  lambda r=last: {"rows": r})


def parse_hub_name(dataset: str) -> tuple[str, str]:
  """(NAME, CONFIG) of `hf:NAME[:CONFIG]` (CONFIG '' when not given)."""
  name, _, config_name = dataset[len(HF_PREFIX):].partition(":")
  return name, config_name


def hub_split_name(hf_splits: str, split: str) -> str:
  return hf_splits.split(",")[SPLITS.index(split)].strip()


class HubSource:
  """A split of a hub dataset streamed by HF `datasets` (a local folder given as NAME reads the
  same way, offline): each row a document. Position: rows read, and `datasets`' own state of the
  stream, from which it resumes without reading the rows before it again."""

  def __init__(self, dataset: str, split_name: str, text_column: str, cache_dir: str):
    import datasets

    datasets.disable_progress_bars()
    name, config_name = parse_hub_name(dataset)
    unreachable = "" if os.path.isdir(name) else _hub_unreachable()
    try:
      with _hub_offline_mode(bool(unreachable)):
        rows = datasets.load_dataset(name, config_name or None, split=split_name, streaming=True,
                                     cache_dir=cache_dir)
    except Exception as e:
      reason = unreachable or f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"
      raise ConfigError(
          f"dataset: cannot load split {split_name!r} of {dataset!r} ({reason}); hf_splits names "
          "the hub's train, valid and test splits, held_out_fraction holds valid and test out of "
          "train, and offline the dataset must be in HF's cache") from None
    if rows.column_names is not None and text_column not in rows.column_names:
      raise ConfigError(f"text_column: {text_column!r} is not a column of {dataset}; its "
                        f"columns: {', '.join(rows.column_names)}")
    self.rows = rows.select_columns([text_column])
    self.text_column = text_column
    self.description = f"{dataset} {split_name} (streamed)"

  def pieces(self, start: dict | None = None, max_rows: int = 0):
    total = 0
    if start:
      self.rows.load_state_dict(start["state"])
      total = start["rows"]
    if max_rows and total >= max_rows:
      return
    for row in self.rows:
      total += 1
      yield Piece(row[self.text_column] or "", True,
                  lambda t=total: {"rows": t, "state": self.rows.state_dict()})
      if max_rows and total >= max_rows:
        return


# ------------------------------------------------------------------------- a held-out fraction


def held_out_split(index: int, fraction: float) -> str:
  """The split piece `index` of a corpus goes to: valid and test each take `fraction` of the
  pieces, train the rest. A hash of the index decides, so any piece's split is known without
  reading the others, and does not depend on the seed."""
  draw = int.from_bytes(hashlib.blake2b(index.to_bytes(8, "little"), digest_size=8,
                                        person=b"gptjax-held-out").digest(), "little") / 2 ** 64
  return "valid" if draw < fraction else "test" if draw < 2 * fraction else "train"


def held_out_statement(split: str, fraction: float) -> str:
  share = f"{fraction * 100:g}%" if split != "train" else f"all but 2 x {fraction * 100:g}%"
  return (f"{share} of the training text's pieces (a document, or {LINES_PER_PIECE} lines of a "
          ".txt file), chosen by a hash of each piece's position")


class HeldOut:
  """The pieces of `source` that held_out_split gives to `split`; an end-of-text follows a piece
  whose successor goes elsewhere (the text does not run on). Position: pieces read, and the
  source's position."""

  def __init__(self, source, split: str, fraction: float):
    self.source, self.split, self.fraction = source, split, fraction
    self.description = f"{source.description}: {held_out_statement(split, fraction)}"

  def pieces(self, start: dict | None = None, max_rows: int = 0):
    index = start["piece"] if start else 0
    for piece in self.source.pieces(start and start["source"], max_rows):
      index += 1
      if held_out_split(index - 1, self.fraction) != self.split:
        continue
      inner = piece.position
      piece.ends_doc = piece.ends_doc or held_out_split(index, self.fraction) != self.split
      piece.position = lambda i=index, inner=inner: {"piece": i, "source": inner()}
      yield piece


# -------------------------------------------------------------------------- one split, opened


def split_identity(dataset: str, split: str, text_column: str, hf_splits: str,
                   held_out_fraction: float) -> str:
  """What the split's tokens depend on besides the tokenizer and max_samples, without opening it:
  a hub name and split, or each local file's path, size and modification time."""
  role = "train" if held_out_fraction else split
  if dataset in HUB_DATASETS:
    source = dataset
  elif dataset.startswith(HF_PREFIX):
    source = f"{dataset}:{hub_split_name(hf_splits, role)}:{text_column}"
  else:
    files = split_files(dataset, role, held_out=bool(held_out_fraction))
    source = "\n".join(f"{os.path.abspath(p)}:{os.path.getsize(p)}:{os.stat(p).st_mtime_ns}"
                       for p in files)
    if not all(p.endswith(".txt") for p in files):
      source += f"\ncolumn {text_column}"
  return source + (f"\nheld out {held_out_fraction!r} as {split}" if held_out_fraction else "")


def check_split(dataset: str, split: str, text_column: str, held_out_fraction: float) -> None:
  """A local split's files, checked without tokenizing (hub datasets: nothing, no network)."""
  if dataset not in HUB_DATASETS and not dataset.startswith(HF_PREFIX):
    check_files(split_files(dataset, split, held_out=bool(held_out_fraction)), text_column)


def open_split(dataset: str, split: str, text_column: str, hf_splits: str,
               held_out_fraction: float, hf_cache_dir: str):
  """The split as a source of Pieces (files checked, a hub dataset opened)."""
  role = "train" if held_out_fraction else split
  if dataset in HUB_DATASETS:
    source = WikiTextSource(dataset, role)
  elif dataset.startswith(HF_PREFIX):
    source = HubSource(dataset, hub_split_name(hf_splits, role), text_column, hf_cache_dir)
  else:
    files = split_files(dataset, role, held_out=bool(held_out_fraction))
    check_files(files, text_column)
    source = FileSource(files, text_column)
  return HeldOut(source, split, held_out_fraction) if held_out_fraction else source
