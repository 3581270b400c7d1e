"""gptjax against a nanoGPT-style PyTorch model of the same shape, on the CPU: training and
evaluation tokens/s, alternating in one process (the CPU is shared: both see the same load).

    python bench/cpu_vs_torch.py     # d_model 64, 2 layers, 2 heads, context 64, batch 16
    python bench/cpu_vs_torch.py --d_model 128 --batch_size 32 --rounds 3

gptjax runs its trainer's own compiled step (gptjax.bench's build: trainer.build_training, the
monitors as configured by default) and its eval step; PyTorch runs a minimal nanoGPT model
(GPT-2 layout: learned positions, pre-LN blocks, tanh-GELU MLP of 4 x d_model, tied head,
vocabulary 50,304, scaled_dot_product_attention) with nanoGPT's AdamW groups (decay on 2-D weights),
gradient clipping at 1.0 and `zero_grad(set_to_none=True)`, eager (`--compile` adds
torch.compile where a C++ compiler is present). Dropout 0 for both, float32, the same random
tokens. Each round times --steps steps of each side after warm-up; the table gives the median
round. Needs torch (`pip install torch`, the CPU wheel). Figures: bench/README.md.
"""
import argparse
import math
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

VOCAB = 50304  # gptjax pads GPT-2's 50,257 to a multiple of 128; nanoGPT to 64: both 50,304
N_VOCAB = 50257


def torch_model(args):
  import torch
  from torch import nn
  from torch.nn import functional as F

  class Block(nn.Module):
    def __init__(self):
      super().__init__()
      d = args.d_model
      self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
      self.qkv, self.attn_proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
      self.fc, self.mlp_proj = nn.Linear(d, args.d_ff), nn.Linear(args.d_ff, d)

    def forward(self, x_BTD):
      B, T, D = x_BTD.shape
      q, k, v = self.qkv(self.ln1(x_BTD)).split(D, dim=2)
      q, k, v = (a.view(B, T, args.num_heads, D // args.num_heads).transpose(1, 2)
                 for a in (q, k, v))
      y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
      x_BTD = x_BTD + self.attn_proj(y.transpose(1, 2).reshape(B, T, D))
      return x_BTD + self.mlp_proj(F.gelu(self.fc(self.ln2(x_BTD)), approximate="tanh"))

  class GPT(nn.Module):
    def __init__(self):
      super().__init__()
      self.wte = nn.Embedding(VOCAB, args.d_model)
      self.wpe = nn.Embedding(args.max_seq_len, args.d_model)
      self.blocks = nn.ModuleList(Block() for _ in range(args.num_layers))
      self.ln_f = nn.LayerNorm(args.d_model)
      for name, p in self.named_parameters():
        if p.dim() >= 2:
          std = 0.02 / math.sqrt(2 * args.num_layers) if name.endswith("proj.weight") else 0.02
          nn.init.normal_(p, 0.0, std)
        elif name.endswith("bias") and "ln" not in name:
          nn.init.zeros_(p)

    def forward(self, idx_BT):
      T = idx_BT.shape[1]
      x = self.wte(idx_BT) + self.wpe(torch.arange(T, device=idx_BT.device))
      for block in self.blocks:
        x = block(x)
      return self.ln_f(x) @ self.wte.weight.T   # tied head

  return GPT()


class TorchSide:
  def __init__(self, args, tokens_np):
    import torch
    import torch.nn.functional as F
    torch.manual_seed(0)
    self.torch, self.F, self.args = torch, F, args
    self.model = torch_model(args)
    decay = [p for p in self.model.parameters() if p.dim() >= 2]
    other = [p for p in self.model.parameters() if p.dim() < 2]
    self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                                  {"params": other, "weight_decay": 0.0}],
                                 lr=3e-4, betas=(0.9, 0.95))
    self.forward = torch.compile(self.model) if args.compile else self.model
    self.batches = [torch.from_numpy(b).long() for b in tokens_np]
    self.calls = 0

  def step(self):
    batch = self.batches[self.calls % len(self.batches)]
    self.calls += 1
    logits = self.forward(batch[:, :-1])
    loss = self.F.cross_entropy(logits.reshape(-1, VOCAB), batch[:, 1:].reshape(-1))
    loss.backward()
    self.torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
    self.opt.step()
    self.opt.zero_grad(set_to_none=True)
    return loss.item()

  def eval_batch(self):
    batch = self.batches[self.calls % len(self.batches)]
    self.calls += 1
    with self.torch.no_grad():
      logits = self.forward(batch[:, :-1])
      losses = self.F.cross_entropy(logits.reshape(-1, VOCAB), batch[:, 1:].reshape(-1),
                                    reduction="none")
      return losses.sum().item()


class JaxSide:
  def __init__(self, args, tokens_np):
    import jax
    import jax.numpy as jnp
    from gptjax import bench, config as config_lib, step
    config = config_lib.base_config()
    config.update(d_model=args.d_model, num_heads=args.num_heads, num_layers=args.num_layers,
                  d_ff=args.d_ff, max_seq_len=args.max_seq_len, batch_size=args.batch_size,
                  dropout=0.0, lr=3e-4)
    self.jax = jax
    self.built = bench._Built(config, total_steps=10000)
    self.built.batches = [jnp.asarray(b) for b in tokens_np]
    self.built.compile()
    eval_step = step.make_eval_step(self.built.model)
    weights = jnp.ones((args.batch_size, args.max_seq_len), jnp.float32)
    self.eval_args = [(b[:, :-1], b[:, 1:], weights) for b in self.built.batches]
    self.eval_step = eval_step
    self.calls = 0

  def step(self):
    self.built.run(1)
    return self.built.metrics["loss"]

  def eval_batch(self):
    out = self.eval_step(self.built.state.params, *self.eval_args[self.calls % 4])
    self.calls += 1
    return out[0]


def timed(side, what: str, n: int) -> float:
  """Seconds per call of n calls; the last result is read (a step's scalar) at the end."""
  call = side.step if what == "train" else side.eval_batch
  out = call()                                  # not timed: any first-call cost
  if hasattr(out, "block_until_ready"):
    out.block_until_ready()
  t = time.perf_counter()
  for _ in range(n):
    out = call()
  if hasattr(out, "block_until_ready"):
    out.block_until_ready()
  return (time.perf_counter() - t) / n


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--d_model", type=int, default=64)
  parser.add_argument("--num_heads", type=int, default=2)
  parser.add_argument("--num_layers", type=int, default=2)
  parser.add_argument("--d_ff", type=int, default=0, help="0 = 4 x d_model")
  parser.add_argument("--max_seq_len", type=int, default=64)
  parser.add_argument("--batch_size", type=int, default=16)
  parser.add_argument("--steps", type=int, default=20, help="steps (and eval batches) a round")
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--compile", action="store_true", help="torch.compile the PyTorch model")
  args = parser.parse_args(argv)
  args.d_ff = args.d_ff or 4 * args.d_model

  import numpy as np
  import torch
  tokens = np.random.default_rng(1).integers(
      0, N_VOCAB, (4, args.batch_size, args.max_seq_len + 1), dtype=np.int32)
  import jax
  sides = {"gptjax": JaxSide(args, tokens), "pytorch": TorchSide(args, tokens)}
  for side in sides.values():   # warm-up
    timed(side, "train", 3)
    timed(side, "eval", 3)
  results = {(name, what): [] for name in sides for what in ("train", "eval")}
  for _ in range(args.rounds):
    for name, side in sides.items():
      for what in ("train", "eval"):
        results[name, what].append(timed(side, what, args.steps))
  tokens_per_call = args.batch_size * args.max_seq_len
  print(f"d_model {args.d_model}, {args.num_layers} layers, {args.num_heads} heads, d_ff "
        f"{args.d_ff}, context {args.max_seq_len}, batch {args.batch_size}, vocab {VOCAB}; "
        f"{os.cpu_count()} CPUs; jax {jax.__version__}, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads{', compiled' if args.compile else ', eager'}); "
        f"median of {args.rounds} rounds of {args.steps}")
  print(f"{'':8} {'train tokens/s':>15} {'ms/step':>8} {'eval tokens/s':>14} {'ms/batch':>9}")
  for name in sides:
    train_s = statistics.median(results[name, "train"])
    eval_s = statistics.median(results[name, "eval"])
    print(f"{name:8} {tokens_per_call / train_s:15,.0f} {1e3 * train_s:8.1f} "
          f"{tokens_per_call / eval_s:14,.0f} {1e3 * eval_s:9.1f}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
