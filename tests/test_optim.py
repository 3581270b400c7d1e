"""Schedule and optimizer: warmup, peak, cosine floor; decay only on matrices."""
import jax.numpy as jnp
import numpy as np
import pytest

from gptjax import optim


def test_warmup_peak_and_cosine_floor():
  s = optim.lr_schedule(lr=1e-3, warmup_steps=100, total_steps=1000, min_lr_ratio=0.1)
  assert float(s(0)) == 0.0
  assert float(s(50)) == pytest.approx(5e-4)
  assert float(s(100)) == pytest.approx(1e-3)
  assert float(s(999)) == pytest.approx(1e-4)          # the last update sits on the floor
  values = np.array([float(s(i)) for i in range(100, 1000)])
  assert np.all(np.diff(values) <= 1e-12)               # monotone decay after the peak
  assert float(s(550)) == pytest.approx(1e-4 + 0.5 * (1e-3 - 1e-4), rel=1e-2)


def test_no_warmup_starts_at_peak():
  s = optim.lr_schedule(lr=3e-4, warmup_steps=0, total_steps=50, min_lr_ratio=0.0)
  assert float(s(0)) == pytest.approx(3e-4)
  assert float(s(49)) == pytest.approx(0.0, abs=1e-12)


def test_weight_decay_mask_is_matrices_only():
  params = {"dense": {"kernel": jnp.ones((3, 4)), "bias": jnp.ones(4)},
            "ln": {"scale": jnp.ones(4)}, "wte": {"embedding": jnp.ones((10, 4))}}
  mask = optim.decay_mask(params)
  assert mask == {"dense": {"kernel": True, "bias": False}, "ln": {"scale": False},
                  "wte": {"embedding": True}}
