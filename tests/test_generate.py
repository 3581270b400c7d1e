"""The KV-cached decode path and the sampler: exact against the full forward, exact with a fake
model, filtering that stays inside its sets, reproducible seeds, the CLI. (The samples a training
run logs are checked in test_evaluate, which trains.)"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptjax import checkpoint, generate, plan, trainer
from gptjax.config import ConfigError, base_config
from gptjax.model import GPT, ModelConfig, init_cache

SMALL = ModelConfig(vocab_size=256, d_model=32, num_heads=4, num_layers=2, d_ff=64,
                    max_seq_len=16, dropout=0.0)


def _params(config=SMALL):
  return jax.jit(GPT(config).init)(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]


def test_decode_mode_has_the_same_parameters():
  init = GPT(SMALL).init
  tokens = jnp.zeros((1, 4), jnp.int32)
  plain = jax.eval_shape(lambda: init(jax.random.key(0), tokens))
  decode = jax.eval_shape(lambda: init(jax.random.key(0), tokens, decode=True))
  assert set(plain) == {"params"} and set(decode) == {"params", "cache"}
  assert plain["params"] == decode["params"]  # same tree, shapes and dtypes


@pytest.mark.parametrize("fused", [False, True], ids=["block", "fused_block"])
def test_cached_decoding_equals_full_forward_at_every_position(fused):
  # Against the plain block's full forward; decoding also with the fused block, whose cache holds
  # k and v without their biases (gptjax.model.QKVDense). Biases not 0, as at init.
  leaves, treedef = jax.tree.flatten(_params())
  params = treedef.unflatten([p + 0.1 * jax.random.normal(jax.random.key(i), p.shape)
                              for i, p in enumerate(leaves)])
  tokens = jax.random.randint(jax.random.key(1), (2, SMALL.max_seq_len), 0, SMALL.vocab_size)
  full = jax.jit(GPT(SMALL).apply)({"params": params}, tokens)
  decoder = dataclasses.replace(SMALL, fused_block=fused)
  step = jax.jit(generate.model_tokens_to_logits(decoder, params, SMALL.vocab_size))
  cache, pieces, start = init_cache(decoder, 2), [], 0
  for size in (5, 1, 1, 3, 1, 5):  # a prefill, single tokens, and chunks written mid-cache
    logits, cache = step(tokens[:, start:start + size], cache)
    pieces.append(logits)
    start += size
  assert start == SMALL.max_seq_len and int(cache["index"]) == start
  np.testing.assert_allclose(np.concatenate(pieces, axis=1), full, rtol=1e-5, atol=1e-5)


def _fake_model(vocab):
  """Predicts token + 1 (mod vocab) with certainty; its 'cache' counts the tokens fed."""
  traces = []

  def tokens_to_logits(tokens_BT, cache):
    traces.append(tokens_BT.shape)
    return 1e4 * jax.nn.one_hot((tokens_BT + 1) % vocab, vocab), cache + tokens_BT.shape[1]

  return tokens_to_logits, traces


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_sampler_follows_a_fake_model_exactly(temperature):
  vocab, eot = 50, 0
  fake, traces = _fake_model(vocab)
  # Rows of different prompt lengths: row 0's prompt (1, 7, 3) must be fed, not predicted.
  prompt = np.array([[1, 7, 3, 0, 0, 0, 0, 0], [5, 6, 0, 0, 0, 0, 0, 0],
                     [46, 0, 0, 0, 0, 0, 0, 0]], np.int32)
  lengths = np.array([3, 2, 1], np.int32)
  sample = jax.jit(lambda p, n, rng: generate.sample(
      fake, jnp.zeros((), jnp.int32), p, n, rng, prefill=0, max_new_tokens=4, eot_id=eot,
      temperature=temperature))
  out = np.asarray(sample(prompt, lengths, jax.random.key(0)))
  np.testing.assert_array_equal(out, [
      [1, 7, 3, 4, 5, 6, 7, eot],     # 4 new tokens, then nothing more
      [5, 6, 7, 8, 9, 10, eot, eot],
      [46, 47, 48, 49, eot, eot, eot, eot]])  # stops at end-of-text
  # One compiled loop: the model was traced for the loop body only, not once per token.
  assert traces == [(3, 1)]


def test_sampler_prefills_in_one_call_then_loops():
  fake, traces = _fake_model(100)
  prompt = np.array([[10, 20, 30, 40, 0, 0, 0]], np.int32)
  out = generate.sample(fake, jnp.zeros((), jnp.int32), prompt, np.array([4], np.int32),
                        jax.random.key(0), prefill=3, max_new_tokens=3, eot_id=99,
                        temperature=0.0)
  np.testing.assert_array_equal(out, [[10, 20, 30, 40, 41, 42, 43]])
  assert traces == [(1, 3), (1, 1)]


def _draws(logits_V, n=4000, **kw):
  keys = jax.random.split(jax.random.key(3), n)
  draw = jax.jit(jax.vmap(lambda k: generate.next_token(logits_V[None], k, 1.0, **kw)[0]))
  return set(np.asarray(draw(keys)).tolist())


def test_top_k_never_samples_outside_the_k_most_likely():
  logits = jax.random.normal(jax.random.key(2), (64,)) * 2
  top5 = set(np.argsort(-np.asarray(logits))[:5].tolist())
  assert _draws(logits, top_k=5) == top5  # inside the set, and all of it is reachable
  filtered = generate.filter_logits(logits[None], top_k=5)[0]
  assert set(np.flatnonzero(np.isfinite(filtered)).tolist()) == top5


def test_top_p_never_samples_outside_the_nucleus():
  logits = jax.random.normal(jax.random.key(4), (64,)) * 2
  probs = np.asarray(jax.nn.softmax(logits))
  order = np.argsort(-probs)
  size = int(np.searchsorted(np.cumsum(probs[order]), 0.7)) + 1  # fewest reaching 0.7
  nucleus = set(order[:size].tolist())
  assert 1 < size < 64
  assert _draws(logits, top_p=0.7) == nucleus
  # Combined, top-k first: the nucleus of the top 3 is within the top 3.
  assert _draws(logits, top_k=3, top_p=0.7) <= set(order[:3].tolist())


def test_greedy_is_argmax():
  logits = jax.random.normal(jax.random.key(5), (3, 64))
  out = generate.next_token(logits, jax.random.key(0), 0.0, top_k=5, top_p=0.5)
  np.testing.assert_array_equal(out, np.argmax(logits, axis=-1))


def test_same_seed_same_sample():
  params = _params()
  prompt, lengths = np.zeros((2, 12), np.int32), np.array([2, 2], np.int32)
  prompt[:, :2] = [17, 42]

  def run(seed):
    return np.asarray(generate.generate_tokens(
        params, prompt, lengths, jax.random.key(seed), model_config=SMALL, n_vocab=250,
        prefill=1, max_new_tokens=10, eot_id=255, temperature=1.0, top_k=0, top_p=1.0))

  a, b, c = run(7), run(7), run(8)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  assert (a[:, 2:] < 250).all()  # the padded vocabulary is never sampled


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory, corpus):
  """An untrained tiny model saved as the trainer saves one (sampling needs no training)."""
  config = ModelConfig(vocab_size=50304, d_model=32, num_heads=2, num_layers=2, d_ff=64,
                       max_seq_len=32, dropout=0.0)
  run_config = base_config()
  run_config.dataset = corpus
  return checkpoint.save_model(str(tmp_path_factory.mktemp("models")), "model_X",
                               _params(config), trainer.model_info(
                                   config, run_config, 50257, plan.resolve(run_config, "cpu", 1)))


def test_cli_prints_samples_and_speed(saved_model, capsys):
  result = generate.run(["generate", "--model", saved_model, "--prompt", "The game",
                         "--max_new_tokens", "6", "--num_samples", "3", "--temperature", "0",
                         "--verbose"])
  out = capsys.readouterr().out
  assert out.count("--- sample") == 3 and "tokens/s" in out and "compile" in out
  assert len(set(result["texts"])) == 1  # greedy: every sample alike
  assert 3 <= result["generated"] <= 18 and result["tokens_per_s"] > 0
  assert all(text in out for text in result["texts"])


@pytest.mark.parametrize("args, message", [
    (["--prompt", " ".join(["word"] * 40)], "prompt: a prompt of 40 tokens is too long"),
    (["--temperature=-1"], "temperature"),
    (["--top_p", "1.5"], "top_p"),
    (["--num_samples", "0"], "num_samples"),
])
def test_cli_bad_input_is_one_line_exit_2(saved_model, capsys, args, message):
  with pytest.raises(SystemExit) as e:
    generate.main(["generate", "--model", saved_model] + args)
  assert e.value.code == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_cli_warns_when_the_context_cuts_generation(saved_model, capsys):
  result = generate.run(["generate", "--model", saved_model, "--prompt", " ".join(["word"] * 28),
                         "--max_new_tokens", "50", "--temperature", "0"])
  assert "generating at most 4" in capsys.readouterr().err
  assert result["generated"] <= 4


def test_training_rejects_a_sample_prompt_longer_than_the_context(tiny_config):
  tiny_config.sample_prompts = "short|" + " ".join(["word"] * 40)
  with pytest.raises(ConfigError, match="sample_prompts: a prompt of 40 tokens"):
    trainer.train_and_evaluate(tiny_config)
