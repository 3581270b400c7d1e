"""How fast gptjax prepares data, and in how much memory (issue 24).

    python bench/tokenize_speed.py [--mb 64] [--repeats 3]
    python bench/tokenize_speed.py --corpus_gb 12.5 --data_limit_gb 1 --workdir /tmp/big

The first form tokenizes the same text (gptjax's WikiText-2 sample, gptjax/assets/sample/train.txt,
repeated to --mb MB) into a fresh token cache with `data.load_tokens`, on one thread and on every
core, and prints tokens/s and MB/s of each, best of --repeats (run in turn, so that a neighbour's
load falls on each alike), their ratio, and the cores each run kept busy (its CPU time over its
wall time: below the thread count, something else had the machine). It also times
the loop the cache was written with before issue 24 (one thread, `encode_ordinary` on each piece
of 2048 lines, ids through a Python list), on the same pieces; that loop's loading through HF
`datasets` is left out of its time.

The second form writes a corpus of --corpus_gb GB (the sample repeated, one train.txt) under
--workdir and prepares it with `python -m gptjax.prepare` in a child process whose heap is
limited to --data_limit_gb GB (RLIMIT_DATA: the file mappings of the cache are not counted, every
allocation is). It samples the child's resident memory every second and prints the peak, the
throughput and the cache's size. The corpus and the cache are removed afterwards.
"""
import argparse
import hashlib
import itertools
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from gptjax import data  # noqa: E402
from gptjax.config import SAMPLE_DIR  # noqa: E402


def _write_corpus(folder: str, n_bytes: int) -> None:
  """train.txt of the sample's training text repeated to `n_bytes`; the sample's valid and test."""
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(SAMPLE_DIR, "train.txt"), "rb") as f:
    text = f.read()
  with open(os.path.join(folder, "train.txt"), "wb") as f:
    for _ in range(max(1, n_bytes // len(text))):
      f.write(text)
  for split in ("valid", "test"):
    shutil.copy(os.path.join(SAMPLE_DIR, f"{split}.txt"), folder)


def _before_issue_24(path: str) -> tuple[int, int]:
  """(ids, bytes) of the loop that wrote the cache before issue 24, on the same pieces."""
  enc = data.get_tokenizer("gpt2")
  digest, n_tokens = hashlib.sha256(), 0
  with open(path, encoding="utf-8") as f, tempfile.TemporaryFile() as out:
    while lines := list(itertools.islice(f, 2048)):
      ids = enc.encode_ordinary("".join(lines))
      chunk = np.asarray(ids, dtype=np.uint16)
      digest.update(chunk.tobytes())
      chunk.tofile(out)
      n_tokens += len(ids)
  return n_tokens + 1, os.path.getsize(path)


def speed(mb: float, repeats: int) -> dict:
  cores = len(os.sched_getaffinity(0))
  work = tempfile.mkdtemp(prefix="gptjax-tokenize-")
  try:
    corpus = os.path.join(work, "corpus")
    _write_corpus(corpus, int(mb * 1e6))
    path = os.path.join(corpus, "train.txt")
    n_bytes = os.path.getsize(path)
    configs = (("before issue 24 (1 thread)", None), ("1 thread", 1), (f"{cores} threads", cores))
    runs = {name: [] for name, _ in configs}
    load_before = os.getloadavg()[0]
    for r in range(repeats):  # interleaved: a neighbour's load falls on every config alike
      for name, threads in configs:
        cache = os.path.join(work, f"cache-{threads}-{r}")
        used, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        if threads is None:
          n_tokens, _ = _before_issue_24(path)
        else:
          n_tokens = len(data.load_tokens(corpus, "train", "gpt2", cache_dir=cache,
                                          log=lambda m: None, threads=threads))
        seconds = time.perf_counter() - start
        cpu = _cpu_seconds(resource.getrusage(resource.RUSAGE_SELF)) - _cpu_seconds(used)
        runs[name].append((seconds, cpu / seconds, n_tokens))
        shutil.rmtree(cache, ignore_errors=True)
    rows = {}
    for name, threads in configs:
      seconds, cores_used, n_tokens = min(runs[name])
      rows[name] = {"threads": threads or 1, "seconds": [round(r[0], 3) for r in runs[name]],
                    "cores_used": [round(r[1], 2) for r in runs[name]], "tokens": n_tokens,
                    "tokens_per_s": n_tokens / seconds, "mb_per_s": n_bytes / 1e6 / seconds,
                    "median_tokens_per_s": n_tokens / statistics.median(r[0] for r in runs[name])}
    one, all_cores = rows["1 thread"], rows[f"{cores} threads"]
    return {"text_mb": n_bytes / 1e6, "cores": cores, "rows": rows,
            "load_average_before_after": [load_before, os.getloadavg()[0]],
            "speedup_all_cores_vs_1_thread": all_cores["tokens_per_s"] / one["tokens_per_s"],
            "speedup_all_cores_vs_before": (all_cores["tokens_per_s"]
                                            / rows["before issue 24 (1 thread)"]["tokens_per_s"])}
  finally:
    shutil.rmtree(work, ignore_errors=True)


def _cpu_seconds(usage) -> float:
  return usage.ru_utime + usage.ru_stime


def _rss_mb(pid: int) -> float:
  with open(f"/proc/{pid}/status") as f:
    for line in f:
      if line.startswith("VmRSS:"):
        return int(line.split()[1]) / 1024
  return 0.0


def memory(corpus_gb: float, data_limit_gb: float, workdir: str) -> dict:
  corpus, cache = os.path.join(workdir, "corpus"), os.path.join(workdir, "cache")
  try:
    start = time.perf_counter()
    _write_corpus(corpus, int(corpus_gb * 1e9))
    written_s = time.perf_counter() - start
    limit = int(data_limit_gb * (1 << 30))
    command = [sys.executable, "-m", "gptjax.prepare", "--dataset", corpus, "--data_cache_dir",
               cache]
    start, samples = time.perf_counter(), []
    child = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"},
                             preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_DATA,
                                                                   (limit, limit)))
    while child.poll() is None:
      samples.append((time.perf_counter() - start, _rss_mb(child.pid)))
      time.sleep(1.0)
    seconds = time.perf_counter() - start
    out = child.stdout.read()
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    cache_bytes = sum(os.path.getsize(os.path.join(root, f))
                      for root, _, files in os.walk(cache) for f in files)
    late = [rss for t, rss in samples if t > 0.1 * seconds]
    return {"returncode": child.returncode, "corpus_gb": os.path.getsize(
                os.path.join(corpus, "train.txt")) / 1e9, "corpus_written_s": written_s,
            "data_limit_gb": data_limit_gb, "peak_rss_mb": peak_kb / 1024,
            "rss_mb_after_the_first_10pct": {"min": min(late, default=0),
                                            "median": statistics.median(late or [0]),
                                            "max": max(late, default=0)},
            "seconds": seconds, "cache_gb": cache_bytes / 1e9,
            "rss_samples_every_10pct": [round(samples[int(i * len(samples) / 10)][1])
                                        for i in range(10)] if samples else [],
            "output": out.strip().splitlines()}
  finally:
    shutil.rmtree(corpus, ignore_errors=True)
    shutil.rmtree(cache, ignore_errors=True)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--mb", type=float, default=64, help="text to tokenize, in MB")
  p.add_argument("--repeats", type=int, default=3, help="timed runs of each; the best is kept")
  p.add_argument("--corpus_gb", type=float, default=0, help="> 0: the memory measurement")
  p.add_argument("--data_limit_gb", type=float, default=1.0, help="the child's heap limit")
  p.add_argument("--workdir", default=tempfile.gettempdir(), help="where the corpus is written")
  args = p.parse_args()
  if args.corpus_gb:
    result = memory(args.corpus_gb, args.data_limit_gb, args.workdir)
  else:
    result = speed(args.mb, args.repeats)
    for name, row in result["rows"].items():
      print(f"{name:>28}: {row['tokens_per_s']:>12,.0f} tokens/s  {row['mb_per_s']:6.1f} MB/s  "
            f"({', '.join(f'{s:.2f}' for s in row['seconds'])} s; cores busy "
            f"{', '.join(f'{c:.2f}' for c in row['cores_used'])})")
    print(f"every core ({result['cores']}) / 1 thread: {result['speedup_all_cores_vs_1_thread']:.2f}x"
          f"; / before issue 24: {result['speedup_all_cores_vs_before']:.2f}x")
  print(json.dumps(result, indent=1))


if __name__ == "__main__":
  main()
