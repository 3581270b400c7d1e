"""Text from a trained model: a key/value-cached sampler compiled as one loop, and the CLI.

    python -m gptjax.generate --model PATH --prompt TEXT [--max_new_tokens N] [--temperature T]
        [--top_k K] [--top_p P] [--num_samples S] [--seed N] [--verbose]

`sample` takes its model as a function `tokens_to_logits(tokens_BT, cache) -> (logits_BTV, cache)`,
so a test can drive it with a fake model (as Flax lm1b's temperature_sampler test does). The prompt
goes through the model in one call (prefill), then one token per iteration of a `lax.while_loop`
over a fixed-size cache: one compilation per (batch, prompt length, settings), none per token.
Rows of one batch may have prompts of different lengths: the loop feeds a row's prompt tokens until
its prompt is used up (as lm1b does), so the training samples of several prompts are one call.

The context is a hard limit: positions past max_seq_len have no position embedding and no cache
slot. A prompt of max_seq_len tokens or more is an error; generation stops at the end of the
context (the CLI warns when --max_new_tokens asks for more). An empty prompt starts from
end-of-text, i.e. samples unconditionally.
"""
import functools
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from gptjax import checkpoint, cli, data, plan
from gptjax.config import ConfigError
from gptjax.model import GPT, ModelConfig, init_cache

# nanoGPT's sample.py defaults.
DEFAULT_TEMPERATURE = 0.8
DEFAULT_TOP_K = 200


def filter_logits(logits_BV, top_k: int = 0, top_p: float = 1.0):
  """Sets to -inf every logit outside the top_k largest (0: no limit) and outside the nucleus:
  the fewest most likely tokens whose probability reaches top_p (1.0: no limit); top-k first."""
  if top_k and top_k < logits_BV.shape[-1]:
    kth_B1 = jax.lax.top_k(logits_BV, top_k)[0][:, -1:]
    logits_BV = jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)
  if top_p < 1.0:
    sorted_BV = -jnp.sort(-logits_BV, axis=-1)
    probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
    # A token is in the nucleus while the tokens more likely than it hold less than top_p,
    # so the most likely token always is.
    kept_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV < top_p
    threshold_B1 = jnp.min(jnp.where(kept_BV, sorted_BV, jnp.inf), axis=-1, keepdims=True)
    logits_BV = jnp.where(logits_BV < threshold_B1, -jnp.inf, logits_BV)
  return logits_BV


def next_token(logits_BV, rng, temperature: float, top_k: int = 0, top_p: float = 1.0):
  """Greedy (argmax) when temperature is 0; otherwise a draw from softmax(logits / temperature)
  restricted by filter_logits."""
  if temperature == 0:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  logits_BV = filter_logits(logits_BV / temperature, top_k, top_p)
  return jax.random.categorical(rng, logits_BV, axis=-1).astype(jnp.int32)


def sample(tokens_to_logits, cache, prompt_BL, lengths_B, rng, *, prefill: int,
           max_new_tokens: int, eot_id: int, temperature: float = 1.0, top_k: int = 0,
           top_p: float = 1.0):
  """Continues row b of `prompt_BL` after its first lengths_B[b] (>= 1) tokens.

  Returns tokens_BL: each prompt followed by up to max_new_tokens sampled tokens; a row stops after
  it samples end-of-text or at position L, and holds eot_id after it stops. The first `prefill`
  tokens (static, at most min(lengths_B) - 1) go through `tokens_to_logits` in one call.
  """
  B, L = prompt_BL.shape
  positions_L = jnp.arange(L)
  tokens_BL = jnp.where(positions_L < lengths_B[:, None], prompt_BL, eot_id).astype(jnp.int32)
  if prefill:
    _, cache = tokens_to_logits(tokens_BL[:, :prefill], cache)
  stop_B = jnp.minimum(lengths_B + max_new_tokens, L)  # one past the last position a row may fill

  def cond(state):
    i, _, _, done_B, _ = state
    return (i < L) & ~jnp.all(done_B)

  def body(state):
    # Feeds the token at i - 1 (its key/value enter the cache) and fills position i.
    i, tokens_BL, cache, done_B, rng = state
    logits_B1V, cache = tokens_to_logits(jax.lax.dynamic_slice_in_dim(tokens_BL, i - 1, 1, 1),
                                         cache)
    rng, key = jax.random.split(rng)
    sampled_B = next_token(logits_B1V[:, -1], key, temperature, top_k, top_p)
    in_prompt_B = i < lengths_B
    token_B = jnp.where(in_prompt_B, tokens_BL[:, i], jnp.where(done_B, eot_id, sampled_B))
    tokens_BL = jax.lax.dynamic_update_slice_in_dim(tokens_BL, token_B[:, None], i, 1)
    done_B = done_B | (~in_prompt_B & (token_B == eot_id)) | (i + 1 >= stop_B)
    return i + 1, tokens_BL, cache, done_B, rng

  state = (jnp.asarray(prefill + 1, jnp.int32), tokens_BL, cache, lengths_B >= stop_B, rng)
  return jax.lax.while_loop(cond, body, state)[1]


def model_tokens_to_logits(model_config: ModelConfig, params, n_vocab: int):
  """The GPT in decode mode as `sample` wants it."""
  model = GPT(model_config)

  def tokens_to_logits(tokens_BT, cache):
    logits_BTV, variables = model.apply({"params": params, "cache": cache}, tokens_BT,
                                        decode=True, mutable=["cache"])
    # The padding rows of the vocabulary are no tokens of the tokenizer: never sample them.
    return logits_BTV[..., :n_vocab], variables["cache"]

  return tokens_to_logits


def _generate(params, prompt_BL, lengths_B, rng, *, model_config: ModelConfig, n_vocab: int,
              prefill: int, max_new_tokens: int, eot_id: int, temperature: float, top_k: int,
              top_p: float):
  return sample(model_tokens_to_logits(model_config, params, n_vocab),
                init_cache(model_config, prompt_BL.shape[0]), prompt_BL, lengths_B, rng,
                prefill=prefill, max_new_tokens=max_new_tokens, eot_id=eot_id,
                temperature=temperature, top_k=top_k, top_p=top_p)


@functools.cache
def _jitted(options: tuple):
  return jax.jit(_generate, compiler_options=dict(options) or None, static_argnames=(
      "model_config", "n_vocab", "prefill", "max_new_tokens", "eot_id", "temperature", "top_k",
      "top_p"))


def generate_jit(model_config: ModelConfig):
  """`sample` with the model, jitted with the XLA options its form needs on this backend
  (plan.model_compiler_options): compiled once per shapes and settings (jit's cache keeps it)."""
  options = plan.model_compiler_options(model_config, jax.default_backend())
  return _jitted(tuple(sorted(options.items())))


def generate_tokens(params, prompt_BL, lengths_B, rng, *, model_config: ModelConfig, **settings):
  """The token ids of `sample` with the model (generate_jit's program)."""
  return generate_jit(model_config)(params, prompt_BL, lengths_B, rng, model_config=model_config,
                                    **settings)


def encode_prompts(encoding, prompts: list[str], max_seq_len: int, max_new_tokens: int,
                   field: str = "prompt"):
  """(prompt_BL, lengths_B, prefill, requested_len) for `generate_tokens`; L is the context end or
  the longest prompt + max_new_tokens, whichever is shorter; requested_len tells a caller whether
  the context cut max_new_tokens. A prompt too long is a ConfigError naming `field`."""
  ids = [encoding.encode_ordinary(p) or [encoding.eot_token] for p in prompts]
  longest = max(len(x) for x in ids)
  if longest >= max_seq_len:
    raise ConfigError(f"{field}: a prompt of {longest} tokens is too long; the model's context is "
                      f"{max_seq_len} tokens, so a prompt may have at most {max_seq_len - 1}")
  requested = longest + max_new_tokens
  L = min(max_seq_len, requested)
  prompt_BL = np.zeros((len(ids), L), np.int32)
  for row, x in enumerate(ids):
    prompt_BL[row, :len(x)] = x
  lengths_B = np.array([len(x) for x in ids], np.int32)
  return prompt_BL, lengths_B, int(lengths_B.min()) - 1, requested


def completions(encoding, tokens_BL, lengths_B, max_new_tokens: int) -> list[list[int]]:
  """The new tokens of each row, up to (not including) its end-of-text."""
  out = []
  for row, start in zip(np.asarray(tokens_BL), np.asarray(lengths_B)):
    new = row[start:start + max_new_tokens].tolist()
    out.append(new[:new.index(encoding.eot_token)] if encoding.eot_token in new else new)
  return out


def sample_texts(model_config: ModelConfig, params, encoding, prompts: list[str],
                 max_new_tokens: int, seed: int, temperature: float = DEFAULT_TEMPERATURE,
                 top_k: int = DEFAULT_TOP_K, top_p: float = 1.0,
                 field: str = "prompt") -> list[str]:
  """One continuation of each prompt. Same prompts, same compiled loop: a training run compiles it
  at its first validation only."""
  prompt_BL, lengths_B, prefill, _ = encode_prompts(encoding, prompts, model_config.max_seq_len,
                                                    max_new_tokens, field)
  tokens_BL = generate_tokens(params, prompt_BL, lengths_B, jax.random.key(seed),
                              model_config=model_config, n_vocab=encoding.n_vocab, prefill=prefill,
                              max_new_tokens=max_new_tokens, eot_id=encoding.eot_token,
                              temperature=temperature, top_k=top_k, top_p=top_p)
  return [encoding.decode(x) for x in completions(encoding, tokens_BL, lengths_B, max_new_tokens)]


def training_sampler(config, model_config: ModelConfig, encoding):
  """None when `config.sample_prompts` is '' (or sample_max_new_tokens 0); else a function
  params -> [(prompt, continuation)] for the trainer to log at each validation. Checks the
  prompts now, so a prompt too long for the context fails before training, not after an epoch."""
  prompts = config.sample_prompts.split("|") if config.sample_prompts else []
  if not prompts or not config.sample_max_new_tokens:
    return None
  encode_prompts(encoding, prompts, model_config.max_seq_len, 1, "sample_prompts")

  def samples(params):
    texts = sample_texts(model_config, params, encoding, prompts, config.sample_max_new_tokens,
                         config.seed, field="sample_prompts")
    return list(zip(prompts, texts))

  return samples


def _define_flags(fv):
  from absl import flags
  flags.DEFINE_string("model", None, "final model directory (models/model_<TIMESTAMP>/) or "
                      "snapshot directory (snapshots/snapshot_<step>/)", flag_values=fv)
  flags.DEFINE_string("prompt", "", "text to continue; '' samples unconditionally (from "
                      "end-of-text)", flag_values=fv)
  flags.DEFINE_integer("max_new_tokens", 200, "tokens to generate per sample (at most up to the "
                       "end of the context)", flag_values=fv)
  flags.DEFINE_float("temperature", DEFAULT_TEMPERATURE, "softmax temperature; 0 = greedy",
                     flag_values=fv)
  flags.DEFINE_integer("top_k", DEFAULT_TOP_K, "sample among the K most likely tokens; 0 = all",
                       flag_values=fv)
  flags.DEFINE_float("top_p", 1.0, "sample within the nucleus of probability P; 1 = all",
                     flag_values=fv)
  flags.DEFINE_integer("num_samples", 1, "samples to generate (one batch)", flag_values=fv)
  flags.DEFINE_integer("seed", 42, "random seed of the sampling", flag_values=fv)
  flags.DEFINE_boolean("verbose", False, "report decode tokens/s (compilation excluded)",
                       flag_values=fv)


def _check(fv) -> None:
  def need(ok, field, allowed):
    if not ok:
      raise ConfigError(f"{field}: {fv[field].value!r} is not allowed; {allowed}")

  need(fv.max_new_tokens > 0, "max_new_tokens", "must be a positive integer")
  need(fv.temperature >= 0, "temperature", "must be >= 0 (0 = greedy)")
  need(fv.top_k >= 0, "top_k", "must be >= 0 (0 = no limit)")
  need(0 < fv.top_p <= 1, "top_p", "must be in (0, 1] (1 = no limit)")
  need(fv.num_samples > 0, "num_samples", "must be a positive integer")


def run(argv) -> dict:
  """Parses `argv`, generates and prints the samples; returns them with the decode timing."""
  fv = cli.parse_flags(argv, _define_flags, "python -m gptjax.generate --model PATH "
                       "--prompt TEXT [options]")
  _check(fv)
  model_config, params, info = checkpoint.load_model(fv.model or "")
  encoding = data.get_tokenizer(info["tokenizer"])
  prompt_BL, lengths_B, prefill, requested = encode_prompts(
      encoding, [fv.prompt] * fv.num_samples, model_config.max_seq_len, fv.max_new_tokens)
  if requested > model_config.max_seq_len:
    print(f"warning: the prompt ({int(lengths_B[0])} tokens) + max_new_tokens "
          f"({fv.max_new_tokens}) pass the context of {model_config.max_seq_len} tokens; "
          f"generating at most {model_config.max_seq_len - int(lengths_B[0])}", file=sys.stderr)
  settings = dict(model_config=model_config, n_vocab=encoding.n_vocab, prefill=prefill,
                  max_new_tokens=fv.max_new_tokens, eot_id=encoding.eot_token,
                  temperature=fv.temperature, top_k=fv.top_k, top_p=fv.top_p)
  args = (params, prompt_BL, lengths_B, jax.random.key(fv.seed))
  t0 = time.perf_counter()
  compiled = generate_jit(model_config).lower(*args, **settings).compile()
  t1 = time.perf_counter()
  tokens_BL = jax.block_until_ready(compiled(*args))
  seconds = time.perf_counter() - t1
  new = completions(encoding, tokens_BL, lengths_B, fv.max_new_tokens)
  texts = [encoding.decode(x) for x in new]
  for i, text in enumerate(texts):
    print(f"--- sample {i + 1} ---\n{fv.prompt}{text}")
  # A row that stopped before its limit stopped at end-of-text: it generated that token too.
  limit = min(fv.max_new_tokens, model_config.max_seq_len - int(lengths_B[0]))
  generated = sum(len(x) + (len(x) < limit) for x in new)
  tokens_per_s = generated / max(seconds, 1e-9)
  if fv.verbose:
    print(f"--- decode: {generated} tokens ({fv.num_samples} sample"
          f"{'s' if fv.num_samples > 1 else ''}, prompt "
          f"{int(lengths_B[0])} tokens) in {seconds:.3f} s = {tokens_per_s:,.1f} tokens/s on "
          f"{jax.devices()[0].device_kind}; compile {t1 - t0:.1f} s excluded")
  return {"texts": texts, "tokens": new, "generated": generated, "seconds": seconds,
          "tokens_per_s": tokens_per_s}


def main(argv=None) -> int:
  return cli.entry_point(run, argv)


if __name__ == "__main__":
  sys.exit(main())
