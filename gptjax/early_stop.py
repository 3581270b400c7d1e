"""Early stopping: when to end training, decided from per-epoch validation and training losses.

This module owns the stopping decision and the best-epoch bookkeeping, nothing else: it is a pure
state machine (no jax, no I/O). The trainer calls `update` once per epoch, keeps a copy of the
weights when it returns `improved=True` (if `early_stop_restore_best`), and stops when the new
state says `stopped`. `EarlyStopState` is plain data so it travels inside a snapshot as JSON and
the decision continues unchanged after a resume.

Two criteria:
  * patience (only when `early_stopping` is on): the validation loss has not improved on the best
    so far by at least `early_stop_min_delta` for `early_stop_patience` epochs in a row;
  * overfitting (whenever `early_stop_overfit_patience` > 0): the gap val_loss - train_loss grew by
    more than `early_stop_overfit_min_delta` over the previous epoch's gap for
    `early_stop_overfit_patience` epochs in a row.
The best validation loss and its epoch are tracked even when neither criterion is active, because
the trainer logs them.
"""
import dataclasses
import math

# Used when the config object lacks a field (e.g. a bare namespace in tests); the values match
# gptjax/config.py.
_DEFAULTS = {
    "early_stopping": False,
    "early_stop_patience": 5,
    "early_stop_min_delta": 0.001,
    "early_stop_restore_best": True,
    "early_stop_overfit_patience": 0,
    "early_stop_overfit_min_delta": 0.01,
}

_FLOAT_FIELDS = ("best_val_loss", "last_gap")


def _get(config, name):
  return getattr(config, name, _DEFAULTS[name])


def patience_active(config) -> bool:
  return bool(_get(config, "early_stopping"))


def overfit_active(config) -> bool:
  return _get(config, "early_stop_overfit_patience") > 0


def _encode_float(x):
  # Strict JSON has no inf/nan (json.dumps would write the non-standard `Infinity`), so
  # non-finite values become strings; finite floats stay numbers, whose repr round-trips exactly.
  if x is None or math.isfinite(x):
    return x
  return repr(float(x))  # 'inf', '-inf' or 'nan'


def _decode_float(x):
  if x is None:
    return None
  return float(x)


@dataclasses.dataclass(frozen=True)
class EarlyStopState:
  """Everything the stopping decision needs from earlier epochs."""
  best_val_loss: float = math.inf
  best_epoch: int = -1
  epochs_without_improvement: int = 0
  last_gap: float | None = None
  gap_growth_streak: int = 0
  stopped: bool = False
  reason: str = ""

  def to_json(self) -> dict:
    d = dataclasses.asdict(self)
    for name in _FLOAT_FIELDS:
      d[name] = _encode_float(d[name])
    return d

  @classmethod
  def from_json(cls, d: dict) -> "EarlyStopState":
    # Missing keys take their defaults so a snapshot written before a field existed still loads.
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names
    if unknown:
      raise ValueError(f"EarlyStopState: unknown fields {sorted(unknown)}")
    kwargs = dict(d)
    for name in _FLOAT_FIELDS:
      if name in kwargs:
        kwargs[name] = _decode_float(kwargs[name])
    return cls(**kwargs)


def update(state: EarlyStopState, config, epoch: int, val_loss: float,
           train_loss: float) -> tuple[EarlyStopState, bool]:
  """Folds one epoch's losses into `state`; returns (new_state, improved).

  `improved` is True when this epoch is the new best (its validation loss beat the best so far by
  at least min_delta; the first finite loss always does). `epoch` is only used in messages and
  `best_epoch`, as given. Once stopped, the state stays stopped with its first reason, but the
  bookkeeping goes on, in case the caller runs further epochs anyway.
  """
  val_loss = float(val_loss)
  train_loss = float(train_loss)
  min_delta = float(_get(config, "early_stop_min_delta"))

  # A NaN loss compares False, so it is never an improvement and counts against patience.
  improved = val_loss < state.best_val_loss - min_delta
  if improved:
    best_val_loss, best_epoch, without = val_loss, epoch, 0
  else:
    best_val_loss, best_epoch = state.best_val_loss, state.best_epoch
    without = state.epochs_without_improvement + 1

  gap = val_loss - train_loss
  overfit_min_delta = float(_get(config, "early_stop_overfit_min_delta"))
  if state.last_gap is not None and gap - state.last_gap > overfit_min_delta:
    streak = state.gap_growth_streak + 1
  else:
    streak = 0

  stopped, reason = state.stopped, state.reason
  if not stopped:
    patience = _get(config, "early_stop_patience")
    overfit_patience = _get(config, "early_stop_overfit_patience")
    if patience_active(config) and without >= patience:
      stopped = True
      best = (f"best {best_val_loss:.4f} at epoch {best_epoch}" if best_epoch >= 0
              else "no finite validation loss yet")
      reason = f"validation loss did not improve by {min_delta:g} for {without} epochs ({best})"
    elif overfit_active(config) and streak >= overfit_patience:
      stopped = True
      reason = (f"the validation-train gap grew by more than {overfit_min_delta:g} for {streak} "
                f"epochs in a row (gap {gap:.3f})")

  new_state = EarlyStopState(
      best_val_loss=best_val_loss,
      best_epoch=best_epoch,
      epochs_without_improvement=without,
      last_gap=gap,
      gap_growth_streak=streak,
      stopped=stopped,
      reason=reason,
  )
  return new_state, improved
