#!/usr/bin/env bash
# Launch gptjax language-model training in the background (nohup), with a timestamped log.
#
#   ./run/run_train_lm.sh [OPTIONS] [-- TRAINER_FLAGS...]
#
# Maps the wrapper options onto `python -m gptjax.train`, validates everything in the
# foreground (bash shape checks, then `python -m gptjax.train ... --check_only`), and only
# then starts training with nohup. Run `./run/run_train_lm.sh --help` for the options.
#
# Exit codes: 0 started (or --help), 2 bad option/value (nothing started),
#             1 environment problem (no python, trainer import failure; nothing started).
set -euo pipefail

PROG="run_train_lm.sh"

# ----------------------------------------------------------------------------- defaults
DEF_PRESET=""
DEF_DATASET="wikitext-103"
DEF_EPOCHS=20
DEF_BATCH_SIZE=32
DEF_LR="3e-4"
DEF_WARMUP=0
DEF_SNAPSHOT=10000
DEF_MONITOR_INTERVAL=10000
DEF_SANITY_CHECK_INTERVAL=10000
PRESETS="tiny small medium"
HUB_DATASETS="wikitext wikitext-103"

usage() {
  cat <<EOF
Usage: ./run/run_train_lm.sh [OPTIONS] [-- TRAINER_FLAGS...]

Train the gptjax GPT language model in the background (nohup) with a timestamped log.
Works from any directory; paths you give are taken relative to your current directory.

Options:
  --preset PRESET             model preset: tiny | small | medium (default: none = manual
                              configuration / the trainer's defaults)
  --dataset DATASET           wikitext (WikiText-2) | wikitext-103 | a folder holding
                              train.txt, valid.txt, test.txt (default: ${DEF_DATASET})
  --epochs N                  passes over the training data, positive integer (default: ${DEF_EPOCHS})
  --batch_size N              sequences per optimizer step, positive integer (default: ${DEF_BATCH_SIZE})
  --lr RATE                   peak learning rate, e.g. 3e-4, 6e-4 (default: ${DEF_LR})
  --warmup STEPS              linear LR warmup steps, 0 disables (default: ${DEF_WARMUP})
  --snapshot N                save a snapshot every N steps, 0 = only at epoch ends (default: ${DEF_SNAPSHOT})
  --monitor_interval N        steps between gradient/weight monitor reports; both monitors are
                              enabled (default: ${DEF_MONITOR_INTERVAL})
  --sanity_check_interval N   steps between NaN/Inf checks, 0 disables (default: ${DEF_SANITY_CHECK_INTERVAL})
  -h, --help                  show this help and exit
  --                          pass every following flag unchanged to python -m gptjax.train,
                              e.g. -- --max_samples 100 --d_model 64 --output_dir DIR
                              (see: python -m gptjax.train --help)

Runs:
  python -m gptjax.train [--model_preset P] --dataset D --epochs N --batch_size N --lr X
      --warmup_steps N --snapshot_interval N --gradient_monitor --gradient_monitor_interval N
      --weight_monitor --weight_monitor_interval N --sanity_check_interval N
      [TRAINER_FLAGS...] --output_dir DIR --log_file DIR/logs/train_TIMESTAMP.log

Output directory: result/lm_{dataset name} in the project root (a dataset folder's base
name), unless --output_dir is given after --. The log is DIR/logs/train_TIMESTAMP.log,
e.g. train_2026FEB15_215234_GMT+00.log.

Python: \$PYTHON if set, else the project's .venv/ or venv/ python, else python3.
Training runs without a terminal: to resume, pass -- --resume --yes.

Examples:
  ./run/run_train_lm.sh --preset small
  ./run/run_train_lm.sh --preset tiny --dataset wikitext --epochs 10
  ./run/run_train_lm.sh --preset small --warmup 4000 --lr 6e-4 --snapshot 5000
  ./run/run_train_lm.sh --preset tiny -- --max_samples 100 --d_model 64
EOF
}

die() {  # die CODE MESSAGE: one line on stderr, nothing started
  echo "${PROG}: error: $2" >&2
  exit "$1"
}

# ----------------------------------------------------------------------------- locations
CALLER_PWD="$(pwd -P)"
SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)"
PROJECT_ROOT="$(cd "${SCRIPT_DIR}/.." && pwd -P)"

# A path the user typed, made usable after we cd to the project root.
from_caller() {
  local p="$1"
  if [[ -z "$p" || "$p" == /* || "$CALLER_PWD" == "$PROJECT_ROOT" ]]; then
    printf '%s' "$p"
  else
    printf '%s' "${CALLER_PWD}/${p}"
  fi
}

is_hub_dataset() {
  local d
  for d in $HUB_DATASETS; do [[ "$1" == "$d" ]] && return 0; done
  return 1
}

# A dataset name stays a name; a folder path is made usable from the project root.
resolve_dataset() {
  local d="$1"
  if is_hub_dataset "$d" || [[ "$d" == /* ]]; then
    printf '%s' "$d"
  elif [[ "$CALLER_PWD" != "$PROJECT_ROOT" && -d "${CALLER_PWD}/${d}" ]]; then
    (cd "${CALLER_PWD}/${d}" && pwd -P)
  else
    printf '%s' "$d"   # not found: left for the trainer's validation to report
  fi
}

# ----------------------------------------------------------------------------- parse
PRESET="$DEF_PRESET"
DATASET="$DEF_DATASET"
EPOCHS="$DEF_EPOCHS"
BATCH_SIZE="$DEF_BATCH_SIZE"
LR="$DEF_LR"
WARMUP="$DEF_WARMUP"
SNAPSHOT="$DEF_SNAPSHOT"
MONITOR_INTERVAL="$DEF_MONITOR_INTERVAL"
SANITY_CHECK_INTERVAL="$DEF_SANITY_CHECK_INTERVAL"
PASSTHROUGH=()

while [[ $# -gt 0 ]]; do
  arg="$1"
  case "$arg" in
    -h|--help)
      usage
      exit 0
      ;;
    --)
      shift
      PASSTHROUGH=("$@")
      break
      ;;
    --preset|--dataset|--epochs|--batch_size|--lr|--warmup|--snapshot|--monitor_interval|--sanity_check_interval)
      [[ $# -ge 2 ]] || die 2 "option ${arg} needs a value (see --help)"
      opt="${arg#--}"
      val="$2"
      shift 2
      ;;
    --preset=*|--dataset=*|--epochs=*|--batch_size=*|--lr=*|--warmup=*|--snapshot=*|--monitor_interval=*|--sanity_check_interval=*)
      opt="${arg%%=*}"
      opt="${opt#--}"
      val="${arg#*=}"
      shift
      ;;
    -*)
      die 2 "unknown option '${arg}'; trainer flags go after '--' (see --help)"
      ;;
    *)
      die 2 "unexpected argument '${arg}' (see --help)"
      ;;
  esac
  case "$opt" in
    preset) PRESET="$val" ;;
    dataset) DATASET="$val" ;;
    epochs) EPOCHS="$val" ;;
    batch_size) BATCH_SIZE="$val" ;;
    lr) LR="$val" ;;
    warmup) WARMUP="$val" ;;
    snapshot) SNAPSHOT="$val" ;;
    monitor_interval) MONITOR_INTERVAL="$val" ;;
    sanity_check_interval) SANITY_CHECK_INTERVAL="$val" ;;
  esac
done

# ----------------------------------------------------------------------------- shape checks
need_positive_int() {
  [[ "$2" =~ ^[0-9]+$ && "$2" =~ [1-9] ]] || die 2 "--$1: '$2' is not allowed; must be a positive integer"
}
need_nonneg_int() {
  [[ "$2" =~ ^[0-9]+$ ]] || die 2 "--$1: '$2' is not allowed; must be 0 or a positive integer"
}

if [[ -n "$PRESET" ]]; then
  ok=0
  for p in $PRESETS; do [[ "$PRESET" == "$p" ]] && ok=1; done
  [[ $ok -eq 1 ]] || die 2 "--preset: '${PRESET}' is not allowed; allowed: ${PRESETS// /, }"
fi
[[ -n "$DATASET" ]] || die 2 "--dataset: must not be empty"
need_positive_int epochs "$EPOCHS"
need_positive_int batch_size "$BATCH_SIZE"
[[ "$LR" =~ ^([0-9]+\.?[0-9]*|\.[0-9]+)([eE][-+]?[0-9]+)?$ ]] \
  || die 2 "--lr: '${LR}' is not allowed; must be a non-negative number such as 3e-4"
need_nonneg_int warmup "$WARMUP"
need_nonneg_int snapshot "$SNAPSHOT"
need_positive_int monitor_interval "$MONITOR_INTERVAL"
need_nonneg_int sanity_check_interval "$SANITY_CHECK_INTERVAL"

DATASET="$(resolve_dataset "$DATASET")"

# Trainer flags after `--`: make path values usable from the project root, and note the
# values that decide the output directory / log file (argparse: the last one wins).
USER_OUTPUT_DIR=""
USER_LOG_FILE=""
EFFECTIVE_DATASET="$DATASET"
if [[ ${#PASSTHROUGH[@]} -gt 0 ]]; then
  for ((i = 0; i < ${#PASSTHROUGH[@]}; i++)); do
    a="${PASSTHROUGH[$i]}"
    case "$a" in
      --dataset|--output_dir|--log_file|--checkpoint_file|--data_cache_dir)
        [[ $((i + 1)) -lt ${#PASSTHROUGH[@]} ]] || die 2 "trainer option ${a} needs a value"
        name="${a#--}"
        v="${PASSTHROUGH[$((i + 1))]}"
        j=$((i + 1))
        eq=0
        ;;
      --dataset=*|--output_dir=*|--log_file=*|--checkpoint_file=*|--data_cache_dir=*)
        name="${a%%=*}"
        name="${name#--}"
        v="${a#*=}"
        j=$i
        eq=1
        ;;
      *)
        continue
        ;;
    esac
    if [[ "$name" == dataset ]]; then
      v="$(resolve_dataset "$v")"
      EFFECTIVE_DATASET="$v"
    else
      v="$(from_caller "$v")"
    fi
    [[ "$name" == output_dir ]] && USER_OUTPUT_DIR="$v"
    [[ "$name" == log_file ]] && USER_LOG_FILE="$v"
    if [[ $eq -eq 1 ]]; then
      PASSTHROUGH[$j]="--${name}=${v}"
    else
      PASSTHROUGH[$j]="$v"
      i=$j
    fi
  done
fi

# ----------------------------------------------------------------------------- environment
cd "$PROJECT_ROOT"
export PYTHONPATH="${PROJECT_ROOT}${PYTHONPATH:+:${PYTHONPATH}}"
export PYTHONUNBUFFERED=1
if [[ -z "${TIKTOKEN_CACHE_DIR:-}" && -d "${PROJECT_ROOT}/../shared/data/tiktoken_cache" ]]; then
  TIKTOKEN_CACHE_DIR="$(cd "${PROJECT_ROOT}/../shared/data/tiktoken_cache" && pwd -P)"
  export TIKTOKEN_CACHE_DIR
fi

if [[ -n "${PYTHON:-}" ]]; then
  PY="$PYTHON"
elif [[ -x "${PROJECT_ROOT}/.venv/bin/python" ]]; then
  PY="${PROJECT_ROOT}/.venv/bin/python"
elif [[ -x "${PROJECT_ROOT}/venv/bin/python" ]]; then
  PY="${PROJECT_ROOT}/venv/bin/python"
else
  PY="python3"
fi
command -v "$PY" >/dev/null 2>&1 || die 1 "python interpreter '${PY}' not found (set PYTHON)"

# ----------------------------------------------------------------------------- output paths
if [[ -n "$USER_OUTPUT_DIR" ]]; then
  OUTPUT_DIR="$USER_OUTPUT_DIR"
else
  if is_hub_dataset "$EFFECTIVE_DATASET"; then
    NAME="$EFFECTIVE_DATASET"
  else
    d="$EFFECTIVE_DATASET"
    while [[ "$d" == */ && "$d" != / ]]; do d="${d%/}"; done
    NAME="$(basename -- "$d")"
  fi
  OUTPUT_DIR="result/lm_${NAME}"
fi

if [[ -n "$USER_LOG_FILE" ]]; then
  LOG_FILE="$USER_LOG_FILE"
else
  TIMESTAMP="$(LC_ALL=C date -u +%Y%b%d_%H%M%S | tr '[:lower:]' '[:upper:]')_GMT+00"
  LOG_FILE="${OUTPUT_DIR}/logs/train_${TIMESTAMP}.log"
  n=1
  while [[ -e "$LOG_FILE" ]]; do   # two launches in the same second
    LOG_FILE="${OUTPUT_DIR}/logs/train_${TIMESTAMP}_${n}.log"
    n=$((n + 1))
  done
fi

abs_path() {  # absolute form of a path relative to the project root (for the printed commands)
  if [[ "$1" == /* ]]; then printf '%s' "$1"; else printf '%s' "${PROJECT_ROOT}/$1"; fi
}

# ----------------------------------------------------------------------------- command
CMD=("$PY" -m gptjax.train)
[[ -n "$PRESET" ]] && CMD+=(--model_preset "$PRESET")
CMD+=(
  --dataset "$DATASET"
  --epochs "$EPOCHS"
  --batch_size "$BATCH_SIZE"
  --lr "$LR"
  --warmup_steps "$WARMUP"
  --snapshot_interval "$SNAPSHOT"
  --gradient_monitor
  --gradient_monitor_interval "$MONITOR_INTERVAL"
  --weight_monitor
  --weight_monitor_interval "$MONITOR_INTERVAL"
  --sanity_check_interval "$SANITY_CHECK_INTERVAL"
)
[[ ${#PASSTHROUGH[@]} -gt 0 ]] && CMD+=("${PASSTHROUGH[@]}")
CMD+=(--output_dir "$OUTPUT_DIR" --log_file "$LOG_FILE")

# ----------------------------------------------------------------------------- validate (foreground)
set +e
# stdin as the background run will have it (none): a resume without --yes is refused here.
CHECK_OUT="$("${CMD[@]}" --check_only 2>&1 </dev/null)"
CHECK_RC=$?
set -e
if [[ $CHECK_RC -ne 0 ]]; then
  last="$(printf '%s\n' "$CHECK_OUT" | sed -e '/^[[:space:]]*$/d' | tail -n 1)"
  last="${last#error: }"  # the trainer's own prefix; die adds ours
  [[ -n "$last" ]] || last="python -m gptjax.train --check_only failed with exit code ${CHECK_RC}"
  if [[ $CHECK_RC -eq 2 ]]; then
    die 2 "$last"
  fi
  die 1 "configuration check failed (exit ${CHECK_RC}): ${last}"
fi

# ----------------------------------------------------------------------------- launch
mkdir -p "$(dirname -- "$LOG_FILE")"
{
  printf '# %s: started %s in %s\n' "$PROG" "$(date -u '+%Y-%m-%d %H:%M:%S UTC')" "$PROJECT_ROOT"
  printf '# command:'
  printf ' %q' "${CMD[@]}"
  printf '\n'
} >>"$LOG_FILE"
nohup "${CMD[@]}" >>"$LOG_FILE" 2>&1 </dev/null &
PID=$!

LOG_ABS="$(abs_path "$LOG_FILE")"
OUT_ABS="$(abs_path "$OUTPUT_DIR")"
echo "Training started in the background."
echo "  PID:        ${PID}"
echo "  Log:        ${LOG_ABS}"
echo "  Output dir: ${OUT_ABS}"
printf '  Command:   '
printf ' %q' "${CMD[@]}"
printf '\n\n'
echo "Follow the log:      tail -f $(printf '%q' "$LOG_ABS")"
echo "Check the process:   ps -p ${PID}"
echo "Stop training:       kill ${PID}"
echo "TensorBoard:         tensorboard --logdir $(printf '%q' "${OUT_ABS}/tensorboard")"
