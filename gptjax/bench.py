"""`python -m gptjax.bench`: how fast the real train step runs, and how close the real loop gets.

Every row builds the trainer's own pieces (trainer.build_training: the plan resolved as a run
resolves it, the model, optimizer, sharded state and jitted step) for one config and measures one
of:
  step (default)  the compiled step on synthetic random tokens: compile seconds, then the median
                  of --repeats windows of --steps steps (warm-up excluded, the device synchronised
                  at both ends of each window), tokens/s, MFU, peak device memory, and on
                  GPUs the SM clock and power nvidia-smi reports meanwhile;
  --loop          the same bare step, then trainer.train_and_evaluate on the config's real data;
                  the loop's tokens/s come from the trainer's own log intervals (the first, which
                  holds compilation, is left out) and are compared with the bare step;
  --save_stall    what one asynchronous Orbax snapshot save (checkpoint.Snapshots) costs: the
                  save call, and the extra time of the steps that follow it.
Rows are the product of --presets (or --config/--model_preset), --batch_sizes, --vary FIELD=a,b
and --monitors. Each row runs in a fresh process (--noisolate: all in this one), so its compile
time and its peak memory are its own.

MFU counts 6*N + 12*L*T*d FLOPs per token (N: every parameter, embeddings included; the
attention term as if unmasked, as nanoGPT and PaLM count it) against --peak_tflops per device,
by default 989 TFLOP/s, the dense bf16 peak of an H100 SXM.
"""
import argparse
import concurrent.futures
import dataclasses
import itertools
import json
import multiprocessing
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from gptjax import config as config_lib

H100_SXM_BF16_TFLOPS = 989.0
_TRACE_TOP = 25
_GAP_NS = 20_000   # idle gaps from here up are a stall, not a kernel launch's


def flops_per_token(n_params: int, num_layers: int, seq_len: int, d_model: int) -> int:
  """Training FLOPs per token: 6N for the matmuls with parameters, 12*L*T*d for attention."""
  return 6 * n_params + 12 * num_layers * seq_len * d_model


# ----------------------------------------------------------------------------- rows

def _parse_value(field: str, text: str):
  from gptjax.config import FIELDS, ConfigError
  if field not in FIELDS:
    raise ConfigError(f"vary: unknown config field {field!r}")
  kind = type(FIELDS[field][0])
  try:
    if kind is bool:
      if text.lower() not in ("true", "false", "1", "0"):
        raise ValueError(text)
      return text.lower() in ("true", "1")
    return kind(text)
  except ValueError:
    raise ConfigError(f"vary: {field}={text!r} is not a {kind.__name__}") from None


def parse_vary(specs) -> list:
  """['dropout=0,0.1'] -> [('dropout', [0.0, 0.1])]."""
  from gptjax.config import ConfigError
  out = []
  for spec in specs:
    field, eq, values = spec.partition("=")
    if not eq or not values:
      raise ConfigError(f"vary: {spec!r} is not FIELD=VALUE[,VALUE...]")
    out.append((field, [_parse_value(field, v) for v in values.split(",")]))
  return out


def apply_monitors(config, setting: str) -> None:
  """'off': every monitor off; 'N': gradient, weight and sanity monitors all every N steps."""
  from gptjax.config import ConfigError
  if setting == "config":
    return
  if setting == "off":
    config.update(gradient_monitor=False, weight_monitor=False, sanity_check_interval=0)
    return
  if not setting.isdigit() or int(setting) < 1:
    raise ConfigError(f"monitors: {setting!r} is not allowed; use config, off or a positive "
                      "interval in steps")
  n = int(setting)
  config.update(gradient_monitor=True, weight_monitor=True, gradient_monitor_interval=n,
                weight_monitor_interval=n, sanity_check_interval=n)


def _int_list(field: str, text: str) -> list:
  from gptjax.config import ConfigError
  try:
    values = [int(v) for v in text.split(",")]
  except ValueError:
    values = []
  if not values or min(values) < 1:
    raise ConfigError(f"{field}: {text!r} is not a comma-separated list of positive integers")
  return values


def expand_rows(args, config_argv) -> list:
  """[(label, config)] for every combination the flags ask for; each config validated."""
  from gptjax import cli
  batches = _int_list("batch_sizes", args.batch_sizes) if args.batch_sizes else [None]
  presets = []  # (preset, its batch sizes): "small:128" pins small's batch size
  for entry in args.presets.split(",") if args.presets else [""]:
    name, colon, batch = entry.partition(":")
    if name:
      config_lib.preset_path(name)  # names the bad preset
    presets.append((name, _int_list("presets", batch) if colon else batches))
  vary = parse_vary(args.vary)
  monitors = args.monitors.split(",")
  rows = []
  for preset, preset_batches in presets:
    argv = ["gptjax.bench"] + (["--model_preset", preset] if preset else []) + config_argv
    base, _, _, _ = cli.parse(argv)
    for batch, values, mon in itertools.product(
        preset_batches, itertools.product(*[v for _, v in vary]), monitors):
      config = base.copy_and_resolve_references()
      if batch:
        config.batch_size = batch
      tags = []
      for (field, _), value in zip(vary, values):
        config[field] = value
        tags.append(f"{field}={value}")
      apply_monitors(config, mon)
      if mon != "config":
        tags.append(f"monitors={mon}")
      config_lib.validate(config)
      name = preset or config.model_preset or "config"
      rows.append((" ".join([f"{name} b{config.batch_size}"] + tags), config))
  return rows


# ----------------------------------------------------------------------------- clocks and power

SMI_FIELDS = "index,clocks.sm,clocks.max.sm,power.draw,power.limit,clocks_event_reasons.active"
POWER_CAP_REASONS = 0x04 | 0x80   # nvidia-smi's "SW power cap" and "HW power brake slowdown"


def summarize_clocks(lines, devices=None):
  """Medians of nvidia-smi samples (`SMI_FIELDS` as CSV, no units) of the GPUs in `devices` (all
  if None): the SM clock, its maximum, the power drawn and its limit, and the fraction of samples
  whose clocks were held down by the power limit. None without a readable sample."""
  samples = []
  for line in lines:
    try:
      index, sm, sm_max, power, limit, reasons = (v.strip() for v in line.split(","))
      sample = (int(index), float(sm), float(sm_max), float(power), float(limit),
                int(reasons, 16))
    except ValueError:   # a header, "[N/A]", or an error message
      continue
    if devices is None or sample[0] in devices:
      samples.append(sample)
  if not samples:
    return None
  median = lambda i: statistics.median(s[i] for s in samples)
  return {"sm_clock_mhz": median(1), "sm_clock_max_mhz": median(2), "power_w": median(3),
          "power_limit_w": median(4), "samples": len(samples),
          "power_capped": sum(bool(s[5] & POWER_CAP_REASONS) for s in samples) / len(samples)}


class ClockSampler:
  """Samples nvidia-smi every `period_ms` while its `with` block runs; `.summary` is then
  summarize_clocks' dict for the GPUs this process sees. A card at its power limit lowers its
  clock: the step is then bound by the energy it takes, and two cards of one kind can differ.
  Off GPU, or without nvidia-smi, nothing runs and the summary is None."""

  def __init__(self, period_ms: int = 100, command: str = "nvidia-smi", force: bool = False):
    self.period_ms, self.command, self.force = period_ms, command, force
    self.summary, self._process, self._out = None, None, None

  def __enter__(self):
    import jax
    if not (self.force or jax.default_backend() == "gpu") or not shutil.which(self.command):
      return self
    self._out = tempfile.TemporaryFile("w+")
    self._process = subprocess.Popen(
        [self.command, f"--query-gpu={SMI_FIELDS}", "--format=csv,noheader,nounits",
         "-lms", str(self.period_ms)], stdout=self._out, stderr=subprocess.DEVNULL)
    return self

  def __exit__(self, *exc):
    if self._process is None:
      return
    self._process.terminate()
    self._process.wait()
    self._out.seek(0)
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    devices = ({int(d) for d in visible.split(",")}
               if visible and all(d.strip().isdigit() for d in visible.split(",")) else None)
    self.summary = summarize_clocks(self._out.read().splitlines(), devices)
    self._out.close()


# ----------------------------------------------------------------------------- the measured step

class _Built:
  """The trainer's step for one config, compiled, with its state and synthetic batches."""

  def __init__(self, config, total_steps: int, n_batches: int = 4):
    import numpy as np
    from gptjax import sharding, trainer
    from gptjax.model import count_params

    n_vocab = config_lib.TOKENIZER_VOCAB[config.tokenizer]
    (self.plan, self.mcfg, self.model, self.mesh, self.rng, self.state,
     self.train_step) = trainer.build_training(config, n_vocab, total_steps)
    mesh = self.mesh
    self.n_params = count_params(self.mcfg)
    self.n_devices = mesh.devices.size
    # Random tokens, several batches in rotation: never zeros, never one cached buffer.
    rows, put = sharding.batch_feeder(mesh, config_lib.sequences_per_step(config))
    tokens = np.random.default_rng(config.seed + 1).integers(
        0, n_vocab, (n_batches, config_lib.sequences_per_step(config), config.max_seq_len + 1),
        dtype=np.int32)
    self.batches = [put(b[rows]) for b in tokens]
    self.calls = 0
    self.compiled = None
    self.metrics = None

  def compile(self) -> float:
    t = time.perf_counter()
    self.compiled = self.train_step.lower(self.state, self.batches[0], self.rng).compile()
    return time.perf_counter() - t

  def run(self, n: int) -> None:
    """Dispatches n steps (asynchronously: the caller synchronises)."""
    for _ in range(n):
      self.state, self.metrics = self.compiled(
          self.state, self.batches[self.calls % len(self.batches)], self.rng)
      self.calls += 1

  def sync(self) -> None:
    import jax
    jax.block_until_ready((self.state, self.metrics))

  def timed(self, n: int) -> float:
    """Seconds for n steps, from an idle device to an idle device."""
    self.sync()
    t = time.perf_counter()
    self.run(n)
    self.sync()
    return time.perf_counter() - t

  def program_bytes(self):
    analysis = self.compiled.memory_analysis()
    if analysis is None:
      return None
    return (analysis.argument_size_in_bytes + analysis.output_size_in_bytes
            - analysis.alias_size_in_bytes + analysis.temp_size_in_bytes)


def _device():
  import jax
  device = jax.devices()[0]
  return device, f"{device.device_kind} ({jax.default_backend()})"


def _peak_bytes():
  device, _ = _device()
  stats = device.memory_stats() or {}
  return stats.get("peak_bytes_in_use")


def loss_vs_float32(built, batch) -> dict:
  """Loss of the row's model (its dtype, attention and the train step's loss code) and of a
  float32, XLA-attention model with optax's plain cross-entropy, on the same parameters and
  tokens."""
  import jax
  import jax.numpy as jnp
  import optax
  from gptjax import plan as plan_lib, step
  from gptjax.model import GPT

  # The same model computed the plainest way: float32, XLA attention, GPT-2's block.
  plain = plan_lib.model_fields(plan_lib.for_inference("float32", "cpu"))
  reference = GPT(dataclasses.replace(built.mcfg, remat=False, **plain))
  inputs, targets = batch[:, :-1], batch[:, 1:]
  row = jax.jit(step.on_mesh(lambda p: step.train_loss(built.model, p, inputs, targets),
                             built.mesh), compiler_options=built.plan.compiler_options())
  ref = jax.jit(lambda p: jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
      reference.apply({"params": p}, inputs), targets)))
  a, b = float(row(built.state.params)), float(ref(built.state.params))
  return {"loss": a, "loss_float32": b, "loss_abs_diff": abs(a - b)}


def measure_step(config, opts, total_steps: int = 10000) -> dict:
  import jax
  built = _Built(config, total_steps)
  out = {}
  if opts["check_loss"]:
    out.update(loss_vs_float32(built, built.batches[0]))
  out["compile_s"] = built.compile()
  if opts["dump_hlo"]:
    os.makedirs(opts["dump_hlo"], exist_ok=True)
    out["hlo"] = os.path.join(opts["dump_hlo"], _slug(opts["label"]) + ".hlo.txt")
    with open(out["hlo"], "w") as f:
      f.write(built.compiled.as_text())
  built.run(max(opts["warmup"], 1))  # the first run also loads the program onto the device
  built.sync()
  with ClockSampler() as clocks:
    windows = [built.timed(opts["steps"]) / opts["steps"] for _ in range(opts["repeats"])]
  loss, finite = jax.device_get((built.metrics["loss"], built.metrics["finite"]))
  if not finite:
    raise FloatingPointError(f"the loss went non-finite ({loss}) on random tokens")
  tokens = config_lib.sequences_per_step(config) * config.max_seq_len
  step_s = statistics.median(windows)
  fpt = flops_per_token(built.n_params, config.num_layers, config.max_seq_len, config.d_model)
  out.update(
      n_params=built.n_params, flops_per_token=fpt, tokens_per_step=tokens,
      ms_per_step=1e3 * step_s, ms_min=1e3 * min(windows), ms_max=1e3 * max(windows),
      ms_mean=1e3 * statistics.fmean(windows), tokens_per_s=tokens / step_s,
      n_devices=built.n_devices,
      mfu=tokens / step_s * fpt / (opts["peak_tflops"] * 1e12 * built.n_devices),
      steps=opts["steps"], repeats=opts["repeats"], last_loss=float(loss),
      peak_bytes=_peak_bytes(), program_bytes=built.program_bytes(),
      compute_dtype=jax.numpy.dtype(built.mcfg.dtype).name, attention=built.mcfg.attention,
      plan=built.plan.to_json(), gpu_clocks=clocks.summary)
  if opts["profile"]:
    try:  # a profiler that cannot start (no CUPTI, say) must not cost the row its figures
      out["profile"] = profile(built, opts["profile"], opts["label"], step_s)
    except Exception as e:
      out["profile_error"] = f"{type(e).__name__}: {str(e)[:200]}"
  return out


def _slug(label: str) -> str:
  return "".join(c if c.isalnum() or c in "._-" else "_" for c in label)


# ----------------------------------------------------------------------------- profile

def _category(name: str) -> str:
  n = name.lower()
  if "nccl" in n:  # where data-parallel scaling is lost: the gradient all-reduce, all-gathers
    return "collectives (NCCL)"
  if "memcpy" in n or "memset" in n:
    return "memcpy/memset"
  if any(k in n for k in ("sdpa", "fmha", "flash", "cudnn")):
    return "attention (cuDNN)"
  if any(k in n for k in ("gemm", "xmma", "cutlass", "cublas", "gemv", "matmul", "sm90_", "dot")):
    return "matmul"
  if "reduce" in n or "softmax" in n:
    return "reductions"
  return "other fusions"


_BLOCK_PARTS = {"ln1": "LayerNorm", "ln2": "LayerNorm", "attn": "attention", "mlp": "MLP"}
# gptjax.kernels' Pallas kernels: their GPU kernels carry the pallas_call's name, not an HLO one
# (with a suffix __1, __2, ... where one name is compiled several times).
_KERNEL_PARTS = {"logsumexp_rows": "loss forward",
                 "layer_norm_fwd": "LayerNorm forward", "layer_norm_bwd": "LayerNorm backward",
                 "bias_gelu_grad": "MLP backward",
                 "softmax_cross_entropy_deferred": "loss (forward and backward)"}


def model_part(op_name: str) -> str:
  """The part of the step an HLO op belongs to, from its op_name metadata (the jax/flax scope):
  'jit(train_step)/transpose(jvp(GPT))/block_3/mlp/fc/reduce_sum' -> 'MLP backward'."""
  direction = " backward" if "transpose(" in op_name else " forward"
  block = re.search(r"/block_\d+/(\w+)", op_name)
  if block:
    return _BLOCK_PARTS.get(block.group(1), "residual adds") + direction
  if "(GPT)" in op_name:
    if "/ln_f/" in op_name:
      return "LayerNorm" + direction
    if "/wte/" in op_name or "/wpe/" in op_name:
      return "embeddings" + direction
    return "output head" + direction
  if "jvp(" in op_name:
    return "loss" + direction
  if "/cond/" in op_name:
    return "monitors"
  return "optimizer and update"


def kernel_part(name: str, op_name=None) -> str:
  """The part of the step a GPU kernel belongs to: from its HLO op's op_name where it has one,
  else from the name of one of gptjax.kernels' Pallas kernels, else its category."""
  if op_name:
    return model_part(op_name)
  return (_KERNEL_PARTS.get(re.sub(r"__\d+$", "", name))
          or f"{_category(name)} (not attributed)")


def hlo_op_names(hlo_text: str) -> dict:
  """{instruction name: op_name} of a compiled program's HLO; GPU kernels of XLA's own fusions
  are named after the instruction with '.' written as '_', so both spellings are keys."""
  names = {}
  for m in re.finditer(r'^\s*(?:ROOT )?%?([\w.\-]+) = [^\n]*?op_name="([^"]+)"', hlo_text,
                       re.M):
    names[m.group(1)] = names[m.group(1).replace(".", "_")] = m.group(2)
  return names


def _merged(intervals) -> list:
  """(start, end) intervals merged into disjoint ones, in order."""
  merged = []
  for start, end in sorted(intervals):
    if merged and start <= merged[-1][1]:
      merged[-1][1] = max(merged[-1][1], end)
    else:
      merged.append([start, end])
  return merged


def hidden_time(collectives, compute) -> tuple[float, float]:
  """(time with a collective running, the part of it during which a compute kernel ran too) on
  one device, from (start, end) intervals of its collective and compute kernels (any stream):
  how much of the communication the schedule hides behind the backward pass."""
  busy, hidden = 0.0, 0.0
  other, j = _merged(compute), 0
  for start, end in _merged(collectives):
    busy += end - start
    while j < len(other) and other[j][1] <= start:
      j += 1
    k = j
    while k < len(other) and other[k][0] < end:
      hidden += min(end, other[k][1]) - max(start, other[k][0])
      k += 1
  return busy, hidden


def idle_gaps(spans) -> tuple[float, list]:
  """(idle time, [(gap, kernel before, kernel after), ...] largest first) of one device between
  its first kernel's start and its last kernel's end, from (start, end, name) of its kernels on
  every stream: the time no kernel ran, where a step bound by its kernels has none."""
  idle, gaps, last_end, last_name = 0.0, [], None, None
  for start, end, name in sorted(spans):
    if last_end is not None and start > last_end:
      idle += start - last_end
      gaps.append((start - last_end, last_name, name))
    if last_end is None or end >= last_end:
      last_end, last_name = end, name
  return idle, sorted(gaps, key=lambda g: -g[0])


def summarize_trace(path: str, n_steps: int, op_names=None) -> dict:
  """Per-step device time by kernel, by category and by part of the model, from a
  jax.profiler trace (xplane.pb) and the program's `hlo_op_names`. Library calls (cuBLAS,
  cuDNN, NCCL) carry no HLO name on the GPU: they count under their category."""
  from jax.profiler import ProfileData
  data = ProfileData.from_file(path)
  planes = [p for p in data.planes if p.name.startswith("/device:GPU")]
  on_gpu = bool(planes)
  if not on_gpu:  # the CPU backend: its thunks carry the HLO op that ran
    planes = [p for p in data.planes if p.name.startswith("/host:CPU")]
  kernels = {}
  lines = {}
  collective_ns = [0.0, 0.0]   # summed over the devices: busy, hidden behind compute
  idle_ns, stalls = 0.0, []     # summed over the devices; the gaps of _GAP_NS and more
  for plane in planes:
    intervals = {True: [], False: []}   # collective or not -> (start, end) of its kernels
    spans = []
    for line in plane.lines:
      events = list(line.events)
      lines[f"{plane.name}/{line.name}"] = (len(events), sum(e.duration_ns for e in events))
      if on_gpu and not line.name.startswith("Stream"):
        continue
      for e in events:
        if on_gpu:
          intervals[_category(e.name) == "collectives (NCCL)"].append(
              (e.start_ns, e.start_ns + e.duration_ns))
          spans.append((e.start_ns, e.start_ns + e.duration_ns, e.name))
        stats = dict(e.stats)
        if not on_gpu and "hlo_op" not in stats:
          continue
        key = (e.name, str(stats.get("hlo_op", "")))
        count, total = kernels.get(key, (0, 0.0))
        kernels[key] = (count + 1, total + e.duration_ns)
    if intervals[True]:
      collective_ns = [a + b for a, b in zip(collective_ns,
                                              hidden_time(intervals[True], intervals[False]))]
    if spans:
      idle, gaps = idle_gaps(spans)
      idle_ns += idle
      stalls += [g for g in gaps if g[0] >= _GAP_NS]
  busy = sum(t for _, t in kernels.values())
  categories, parts = {}, {}
  for (name, op), (_, t) in kernels.items():
    categories[_category(name)] = categories.get(_category(name), 0.0) + t
    part = kernel_part(name, (op_names or {}).get(op) or (op_names or {}).get(name))
    parts[part] = parts.get(part, 0.0) + t
  top = sorted(kernels.items(), key=lambda kv: -kv[1][1])[:_TRACE_TOP]
  per_step = lambda ns: ns / n_steps / 1e6
  n_dev = max(len(planes), 1)
  return {
      "device_busy_ms_per_step": per_step(busy),
      "kernels_per_step": sum(c for c, _ in kernels.values()) / n_steps,
      "categories_ms_per_step": {k: per_step(v) for k, v in
                                 sorted(categories.items(), key=lambda kv: -kv[1])},
      "parts_ms_per_step": {k: per_step(v) for k, v in
                            sorted(parts.items(), key=lambda kv: -kv[1])},
      "top_kernels": [{"name": name[:120], "hlo_op": op[:80], "calls_per_step": c / n_steps,
                       "ms_per_step": per_step(t)} for (name, op), (c, t) in top],
      "lines": {k: {"events": n, "ms": t / 1e6} for k, (n, t) in lines.items()},
      # Per device: the time a collective ran, and the part of it hidden behind compute.
      "collectives_ms_per_step_per_device": per_step(collective_ns[0] / n_dev),
      "collectives_hidden_ms_per_step_per_device": per_step(collective_ns[1] / n_dev),
      # Per device: the time between kernels (GPUs), and the gaps of _GAP_NS or more among it.
      "idle_ms_per_step_per_device": per_step(idle_ns / n_dev),
      "stalls_per_step_per_device": len(stalls) / n_steps / n_dev,
      "stalls_ms_per_step_per_device": per_step(sum(g for g, _, _ in stalls) / n_dev),
      "largest_stalls": [{"us": g / 1e3, "after": a[:80], "before": b[:80]}
                         for g, a, b in sorted(stalls, key=lambda g: -g[0])[:_TRACE_TOP]],
  }


def profile(built, directory: str, label: str, step_s: float, n_steps: int = 3) -> dict:
  import glob
  import jax
  trace_dir = os.path.join(directory, _slug(label))
  built.sync()
  with jax.profiler.trace(trace_dir):
    built.run(n_steps)
    built.sync()
  (path,) = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True))[-1:]
  summary = summarize_trace(path, n_steps, hlo_op_names(built.compiled.as_text()))
  summary["wall_ms_per_step"] = 1e3 * step_s
  with open(os.path.join(directory, _slug(label) + ".profile.json"), "w") as f:
    json.dump(summary, f, indent=1)
  print(format_profile(label, summary), flush=True)
  return {k: summary[k] for k in ("device_busy_ms_per_step", "kernels_per_step",
                                  "categories_ms_per_step", "parts_ms_per_step",
                                  "collectives_ms_per_step_per_device",
                                  "collectives_hidden_ms_per_step_per_device",
                                  "idle_ms_per_step_per_device", "stalls_per_step_per_device",
                                  "stalls_ms_per_step_per_device", "largest_stalls")}


def format_profile(label: str, s: dict) -> str:
  lines = [f"profile {label}: wall {s['wall_ms_per_step']:.2f} ms/step, device busy "
           f"{s['device_busy_ms_per_step']:.2f} ms in {s['kernels_per_step']:.0f} kernels"]
  lines += [f"  {k:<20} {v:8.2f} ms" for k, v in s["categories_ms_per_step"].items()]
  busy = s.get("collectives_ms_per_step_per_device", 0.0)
  if busy:
    hidden = s["collectives_hidden_ms_per_step_per_device"]
    lines += [f"  collectives per device: {busy:.2f} ms/step, {hidden:.2f} ms "
              f"({hidden / busy:.0%}) hidden behind compute, {busy - hidden:.2f} ms exposed"]
  idle = s.get("idle_ms_per_step_per_device", 0.0)
  if idle:
    lines += [f"  idle between kernels per device: {idle:.2f} ms/step, of it "
              f"{s['stalls_ms_per_step_per_device']:.2f} ms in "
              f"{s['stalls_per_step_per_device']:.0f} gaps of {_GAP_NS // 1000} us or more; "
              "the largest:"]
    lines += [f"    {g['us']:8.0f} us after {g['after'][:50]}, before {g['before'][:50]}"
              for g in s["largest_stalls"][:8]]
  lines += ["  by part of the step:"]
  lines += [f"    {k:<34} {v:8.2f} ms" for k, v in s["parts_ms_per_step"].items()]
  lines += [f"  {k['ms_per_step']:8.3f} ms x{k['calls_per_step']:<4g} {k['name'][:70]}  "
            f"[{k['hlo_op'][:40]}]" for k in s["top_kernels"][:15]]
  return "\n".join(lines)


# ----------------------------------------------------------------------------- loop, save stall

def _use_compilation_cache() -> None:
  """A persistent compilation cache for the rest of this process, unless one is set already."""
  import atexit
  import jax
  if not jax.config.jax_compilation_cache_dir:
    directory = tempfile.mkdtemp(prefix="gptjax-bench-jit-")
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    jax.config.update("jax_compilation_cache_dir", directory)


def measure_loop(config, opts) -> dict:
  """The bare step, then the whole trainer on the config's data, at the same batch size."""
  from gptjax import data, trainer
  workdir = tempfile.mkdtemp(prefix="gptjax-bench-loop-")
  # The trainer compiles the very program measured below: the cache lets it load that instead.
  _use_compilation_cache()
  try:
    tokens = data.load_tokens(config.dataset, "train", config.tokenizer, config.max_samples,
                              config.data_cache_dir, threads=config.tokenizer_threads,
                              **data.source_options(config))
    windows = data.TrainWindows(tokens, config.max_seq_len, config_lib.sequences_per_step(config),
                                config.seed)
    out = measure_step(config, opts, windows.steps_per_epoch * config.epochs)
    config = config.copy_and_resolve_references()
    config.output_dir = config.output_dir or os.path.join(workdir, "run")
    t = time.perf_counter()
    summary = trainer.train_and_evaluate(config)
    intervals = summary["throughput"][1:]  # the first holds compilation and the first step
    if not intervals:
      raise ValueError("the run logged fewer than two intervals; raise epochs or lower "
                       "log_interval")
    steps = sum(i["steps"] for i in intervals)
    seconds = sum(i["seconds"] for i in intervals)
    loop_tps = steps * out["tokens_per_step"] / seconds
    rates = [i["steps"] / i["seconds"] * out["tokens_per_step"] for i in intervals]
    out.update(loop_tokens_per_s=loop_tps, loop_steps_timed=steps,
               loop_interval_tokens_per_s_min=min(rates),
               loop_interval_tokens_per_s_max=max(rates),
               # The median interval: the steady loop, without the interval that follows an
               # epoch's evaluation and snapshot save (one per epoch, however long the epoch).
               loop_interval_tokens_per_s_median=statistics.median(rates),
               loop_vs_step=loop_tps / out["tokens_per_s"], loop_wall_s=time.perf_counter() - t,
               loop_status=summary.get("status"))
    return out
  finally:
    shutil.rmtree(workdir, ignore_errors=True)


def measure_save_stall(config, opts) -> dict:
  """Windows of --steps steps with and without an async snapshot save at their start."""
  import jax
  from gptjax import checkpoint
  built = _Built(config, 10000)
  out = {"compile_s": built.compile()}
  built.run(max(opts["warmup"], 1))
  workdir = tempfile.mkdtemp(prefix="gptjax-bench-save-")
  snapshots = checkpoint.Snapshots(os.path.join(workdir, "snapshots"), 2)
  n = opts["steps"]
  # Two ways to start the same async save: Orbax's own copy of the device arrays, or the
  # device-to-host copy first (jax.device_get) and Orbax handed host arrays. `d2h` is that copy
  # alone: the floor of any save's stall.
  times = {k: [] for k in ("plain", "saving", "calls", "host_saving", "host_calls", "d2h")}

  def pair(kind, host_first):
    times["plain"].append(built.timed(n))
    built.sync()
    t = time.perf_counter()
    state = built.state
    if host_first:
      state = jax.device_get(state)
    snapshots.save(int(built.state.step), {"train": state}, {"step": built.calls})
    times[kind + "calls"].append(time.perf_counter() - t)
    built.run(n)
    built.sync()
    times[kind + "saving"].append(time.perf_counter() - t)
    snapshots.wait()  # the write finishes before the next pair, outside the timed windows

  try:
    for _ in range(opts["repeats"]):
      pair("", False)
      pair("host_", True)
      built.sync()
      t = time.perf_counter()
      jax.device_get(built.state)
      times["d2h"].append(time.perf_counter() - t)
  finally:
    snapshots.close()
    shutil.rmtree(workdir, ignore_errors=True)
  med = {k: statistics.median(v) for k, v in times.items()}
  plain, saving = times["plain"], times["saving"]
  tokens = config_lib.sequences_per_step(config) * config.max_seq_len
  step_s = med["plain"] / n
  out.update(
      n_params=built.n_params, tokens_per_step=tokens, steps=n, repeats=opts["repeats"],
      ms_per_step=1e3 * step_s, tokens_per_s=tokens / step_s,
      save_call_ms=1e3 * med["calls"],
      stall_ms_per_save=1e3 * (med["saving"] - med["plain"]),
      stall_ms_min=1e3 * (min(saving) - max(plain)), stall_ms_max=1e3 * (max(saving) - min(plain)),
      host_first_call_ms=1e3 * med["host_calls"],
      host_first_stall_ms=1e3 * (med["host_saving"] - med["plain"]),
      d2h_ms=1e3 * med["d2h"],
      snapshot_bytes=sum(x.nbytes for x in jax.tree.leaves(built.state)),
      peak_bytes=_peak_bytes())
  return out


# ----------------------------------------------------------------------------- running rows

def run_row(label: str, config_dict: dict, opts: dict) -> dict:
  """One row, in whatever process calls it; failures become an `error` entry."""
  import ml_collections
  config = ml_collections.ConfigDict(config_dict)
  opts = dict(opts, label=label)
  _, device = _device()
  print(f"[{label}] {device}: measuring ({opts['mode']})", flush=True)
  row = {"label": label, "device": device, "mode": opts["mode"],
         "batch_size": config.batch_size, "seq_len": config.max_seq_len,
         "dropout": config.dropout, "remat": config.remat,
         "xla_flags": os.environ.get("XLA_FLAGS", "")}
  try:
    measure = {"step": measure_step, "loop": measure_loop, "save_stall": measure_save_stall}
    row.update(measure[opts["mode"]](config, opts))
  except Exception as e:  # an out-of-memory row must not end the table
    from gptjax.train import out_of_memory
    if out_of_memory(e):
      row["error"] = (f"out of memory at batch {config.batch_size} (JAX takes 75% of the device "
                      "unless XLA_PYTHON_CLIENT_MEM_FRACTION says otherwise)")
    else:
      row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e) else ''}"
  print(f"[{label}] " + format_row(row, opts["peak_tflops"]), flush=True)
  return row


def _run_isolated(label, config_dict, opts) -> dict:
  context = multiprocessing.get_context("spawn")  # a fresh process: no CUDA state is inherited
  with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
    try:
      return pool.submit(run_row, label, config_dict, opts).result()
    except concurrent.futures.process.BrokenProcessPool as e:
      return {"label": label, "error": f"the row's process died ({e})"}


def _gb(n) -> str:
  return "-" if n is None else f"{n / 2**30:.1f}"


def format_row(row: dict, peak_tflops: float) -> str:
  if "error" in row:
    return f"error: {row['error']}"
  if row["mode"] == "save_stall":
    return (f"{row['ms_per_step']:.2f} ms/step; save call {row['save_call_ms']:.0f} ms, stall "
            f"{row['stall_ms_per_save']:.0f} ms per save ({row['stall_ms_min']:.0f} to "
            f"{row['stall_ms_max']:.0f}); device-to-host copy first: call "
            f"{row['host_first_call_ms']:.0f} ms, stall {row['host_first_stall_ms']:.0f} ms; "
            f"the copy alone {row['d2h_ms']:.0f} ms; snapshot {_gb(row['snapshot_bytes'])} GiB")
  text = (f"{row['tokens_per_s']:,.0f} tok/s, {row['ms_per_step']:.2f} ms/step "
          f"({row['ms_min']:.2f}-{row['ms_max']:.2f}), MFU {100 * row['mfu']:.1f}% of "
          f"{peak_tflops:g} TFLOP/s, compile {row['compile_s']:.1f} s, peak "
          f"{_gb(row['peak_bytes'])} GiB")
  if "loop_tokens_per_s" in row:
    text += (f"; loop {row['loop_tokens_per_s']:,.0f} tok/s = {100 * row['loop_vs_step']:.1f}% "
             f"of the bare step over {row['loop_steps_timed']} steps, its median log interval "
             f"{100 * row['loop_interval_tokens_per_s_median'] / row['tokens_per_s']:.1f}%")
  if "loss_abs_diff" in row:
    text += f"; loss {row['loss']:.5f} vs float32 {row['loss_float32']:.5f}"
  if row.get("gpu_clocks"):
    c = row["gpu_clocks"]
    text += (f"; SM clock {c['sm_clock_mhz']:,.0f} of {c['sm_clock_max_mhz']:,.0f} MHz, "
             f"{c['power_w']:.0f} of {c['power_limit_w']:.0f} W, at the power limit in "
             f"{100 * c['power_capped']:.0f}% of {c['samples']} samples")
  return text


def format_table(rows: list, peak_tflops: float) -> str:
  head = (f"{'config':<36} {'tok/s':>11} {'ms/step (min-max)':>22} {'MFU':>6} {'compile':>8} "
          f"{'peak GiB':>8}  device")
  out = [head, "-" * len(head)]
  for r in rows:
    if "error" in r or r.get("mode") == "save_stall":
      out.append(f"{r['label']:<36} {format_row(r, peak_tflops)}")
      continue
    spread = f"{r['ms_per_step']:.2f} ({r['ms_min']:.2f}-{r['ms_max']:.2f})"
    out.append(f"{r['label']:<36} {r['tokens_per_s']:>11,.0f} {spread:>22} "
               f"{100 * r['mfu']:>5.1f}% {r['compile_s']:>7.1f}s {_gb(r['peak_bytes']):>8}  "
               f"{r['device']}")
    if "loop_tokens_per_s" in r:
      out.append(f"{'  full loop (trainer)':<36} {r['loop_tokens_per_s']:>11,.0f} "
                 f"{'':>22} {100 * r['mfu'] * r['loop_vs_step']:>5.1f}%  = "
                 f"{100 * r['loop_vs_step']:.1f}% of the bare step")
  return "\n".join(out)


def best_batches(rows: list) -> dict:
  """{config: (its fastest row, the batch sizes tried)} for every config (the row's label less
  its batch size) timed at two or more batch sizes: the batch size the benchmark finds best."""
  groups = {}
  for r in rows:
    if "error" not in r and r.get("mode") == "step":
      key = " ".join(t for t in r["label"].split() if not (t[0] == "b" and t[1:].isdigit()))
      groups.setdefault(key, []).append(r)
  return {key: (max(rs, key=lambda r: r["tokens_per_s"]), sorted(r["batch_size"] for r in rs))
          for key, rs in groups.items() if len({r["batch_size"] for r in rs}) > 1}


def format_best(rows: list, peak_tflops: float) -> str:
  return "\n".join(
      f"best batch size for {key}: {best['batch_size']} ({best['tokens_per_s']:,.0f} tok/s, MFU "
      f"{100 * best['mfu']:.1f}% of {peak_tflops:g} TFLOP/s; tried {', '.join(map(str, tried))})"
      for key, (best, tried) in best_batches(rows).items())


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="python -m gptjax.bench", allow_abbrev=False,
      description="Time gptjax's real train step (and loop). Any trainer option is accepted too "
                  "(--config FILE, --model_preset X, --config.FIELD=VALUE, --dropout 0, ...).")
  p.add_argument("--presets", default="",
                 help="comma-separated presets, e.g. tiny,small,medium; PRESET:B pins that "
                      "preset's batch size, e.g. tiny:256,small:128,medium:32")
  p.add_argument("--batch_sizes", default="", help="comma-separated batch sizes (sequences)")
  p.add_argument("--vary", action="append", default=[], metavar="FIELD=V1,V2",
                 help="one row per value of a config field (repeatable), e.g. dropout=0,0.1")
  p.add_argument("--monitors", default="config",
                 help="comma-separated: config (as configured), off (every monitor off), or N "
                      "(gradient, weight and sanity monitors all every N steps)")
  p.add_argument("--steps", type=int, default=50,
                 help="steps per timed window (each window also pays one pipeline fill: short "
                      "windows read slower than the steady state)")
  p.add_argument("--repeats", type=int, default=5, help="timed windows; the median is reported")
  p.add_argument("--warmup", type=int, default=3, help="untimed steps after compilation")
  p.add_argument("--peak_tflops", type=float, default=H100_SXM_BF16_TFLOPS,
                 help="the peak MFU is measured against (default: H100 SXM dense bf16)")
  p.add_argument("--json", default="", help="also write every figure to this JSON file")
  p.add_argument("--loop", action="store_true",
                 help="also run the real training loop (trainer.train_and_evaluate on the "
                      "config's dataset and epochs) and compare its tokens/s")
  p.add_argument("--save_stall", action="store_true",
                 help="measure the stall of an asynchronous snapshot save instead")
  p.add_argument("--check_loss", action="store_true",
                 help="compare the initial loss with a float32, XLA-attention model's")
  p.add_argument("--profile", default="", metavar="DIR",
                 help="trace 3 steps per row into DIR and print where the device time goes")
  p.add_argument("--dump_hlo", default="", metavar="DIR",
                 help="write each row's optimized HLO to DIR")
  p.add_argument("--noisolate", dest="isolate", action="store_false",
                 help="run every row in this process (faster; a row's compile time and peak "
                      "memory then include what earlier rows left: by default each row runs in a "
                      "fresh process)")
  return p


def main(argv=None) -> int:
  from gptjax import cli
  from gptjax.config import ConfigError
  argv = list(sys.argv[1:] if argv is None else argv)
  args, config_argv = build_parser().parse_known_args(argv)
  try:
    if args.loop and args.save_stall:
      raise ConfigError("loop: --loop and --save_stall are separate measurements; give one")
    for name in ("steps", "repeats"):
      if getattr(args, name) < 1:
        raise ConfigError(f"{name}: {getattr(args, name)} is not allowed; must be >= 1")
    if args.peak_tflops <= 0:
      raise ConfigError(f"peak_tflops: {args.peak_tflops} is not allowed; must be > 0")
    rows = expand_rows(args, config_argv)
  except ConfigError as e:
    cli.fail(str(e))
  opts = {"mode": "loop" if args.loop else "save_stall" if args.save_stall else "step",
          "steps": args.steps, "repeats": args.repeats, "warmup": args.warmup,
          "peak_tflops": args.peak_tflops, "check_loss": args.check_loss,
          "profile": os.path.abspath(args.profile) if args.profile else "",
          "dump_hlo": os.path.abspath(args.dump_hlo) if args.dump_hlo else ""}
  results = []
  for label, config in rows:
    run = _run_isolated if args.isolate else run_row
    results.append(run(label, config.to_dict(), opts))
  import jax
  report = {"date": time.strftime("%Y-%m-%d"), "peak_tflops": args.peak_tflops,
            "jax": jax.__version__, "argv": argv, "rows": results}
  report["best_batch_size"] = {key: best["batch_size"]
                                for key, (best, _) in best_batches(results).items()}
  if args.json:
    with open(args.json, "w") as f:
      json.dump(report, f, indent=1)
  print(f"\ngptjax.bench {report['date']}, jax {jax.__version__}, MFU against "
        f"{args.peak_tflops:g} TFLOP/s")
  print(format_table(results, args.peak_tflops))
  best = format_best(results, args.peak_tflops)
  if best:
    print(best)
  return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
  sys.exit(main())
