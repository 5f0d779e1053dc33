#!/usr/bin/env bash
# Every check that needs a GPU, in one run (issue 16). Prepared for a session that is lent one.
#
#   bash benchmarks/gpu_checks.sh                      # CUDA: the checks below, no preset timing
#   bash benchmarks/gpu_checks.sh --presets            # also seconds per meta-step of --preset
#                                                      #   gpu_short (warp_leap, maml)
#   bash benchmarks/gpu_checks.sh --device cpu         # the same commands on a CPU (CUDA tests
#                                                      #   skipped, shortened precision timing)
#
# Stages (each runs even if an earlier one failed; the summary lists the failed ones and the
# exit status is 1 if any failed):
#   env        python, torch, CUDA and the GPU's name
#   pytest     python -m pytest -m cuda (on a CPU: collected and reported as skipped)
#   data       extracts the Omniglot archives from --archives into --root (make_omniglot.sh -d)
#              unless --root/omniglot exists
#   omniglot   every --meta_model of main.py for 2 meta-steps, both protocols, on the real
#              archives (benchmarks/omniglot_runs.py)
#   precision  float32 exact / tf32 MAML meta-gradients against float64 on the Omniglot net and
#              seconds per meta-step in each (benchmarks/precision.py; fails if exact > 1e-4)
#   presets    (with --presets) seconds per meta-step of --preset gpu_short
#
# Options:
#   --device cuda|cpu  default: cuda when torch sees one, else cpu
#   --archives DIR     the Omniglot .zip archives (default data/archives; env OMNIGLOT_ARCHIVES)
#   --root DIR         where they are extracted (default data; main.py --root)
#   --presets          add the presets stage
#   --stages LIST      comma-separated subset of env,pytest,data,omniglot,precision,presets
#
# The device machine has no internet and does not see ../shared: copy the archives into the
# git-ignored data/ folder first and carry it, e.g.
#   mkdir -p data/archives && cp ../shared/data/omniglot/*.zip ../shared/data/omniglot/SHA256SUMS data/archives/
# and run with the device tool's carry=["data/archives"] (2.9 MB; the extracted folder and its
# cache are 30 MB, a good part of the 64 MiB carry limit).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="src/metazoo:src/maml:src/leap:src/warpgrad${PYTHONPATH:+:$PYTHONPATH}"
PYTHON=${PYTHON:-python}

DEVICE="" ARCHIVES=${OMNIGLOT_ARCHIVES:-data/archives} ROOT=data PRESETS=0
STAGES=env,pytest,data,omniglot,precision
while [[ $# -gt 0 ]]; do
  case $1 in
    --device) DEVICE=$2; shift 2 ;;
    --archives) ARCHIVES=$2; shift 2 ;;
    --root) ROOT=$2; shift 2 ;;
    --presets) PRESETS=1; shift ;;
    --stages) STAGES=$2; shift 2 ;;
    -h|--help) sed -n '2,/^set /p' "$0" | grep '^#' | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_checks.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
[[ $PRESETS == 1 ]] && STAGES="$STAGES,presets"
if [[ -z $DEVICE ]]; then
  DEVICE=$("$PYTHON" -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")
fi
[[ $DEVICE == cuda || $DEVICE == cpu ]] || { echo "--device must be cuda or cpu" >&2; exit 2; }
NO_CUDA=() PRECISION_ARGS=()
if [[ $DEVICE == cpu ]]; then
  NO_CUDA=(--no_cuda)
  PRECISION_ARGS=(--tasks 1 --rounds 2 --repeat 1)  # the CPU only shows that the script runs
fi

FAILED=()
stage() {  # stage NAME COMMAND...: runs it if NAME is selected, times it, records failure
  local name=$1; shift
  [[ ",$STAGES," == *",$name,"* ]] || return 0
  echo "=== $name: $*"
  local start=$SECONDS
  if "$@"; then
    echo "=== $name ok ($((SECONDS - start)) s)"
  else
    echo "=== $name FAILED ($((SECONDS - start)) s)"
    FAILED+=("$name")
  fi
}

env_info() {
  "$PYTHON" - <<'EOF'
import sys, torch
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, "
      f"cuda available {torch.cuda.is_available()}, cuda {torch.version.cuda}")
if torch.cuda.is_available():
    print(f"gpu {torch.cuda.get_device_name(0)}, {torch.cuda.device_count()} device(s)")
EOF
}

data() {
  if [[ -d $ROOT/omniglot ]]; then
    echo "$ROOT/omniglot exists"
  elif [[ -d $ARCHIVES ]]; then
    bash make_omniglot.sh -d --source "$ARCHIVES" --root "$ROOT"
  else
    echo "no archives in $ARCHIVES: copy the Omniglot .zip files there (see --help)" >&2
    return 1
  fi
}

stage env env_info
stage pytest "$PYTHON" -m pytest -q -m cuda -p no:cacheprovider
stage data data
stage omniglot "$PYTHON" benchmarks/omniglot_runs.py --root "$ROOT" "${NO_CUDA[@]}"
stage precision "$PYTHON" benchmarks/precision.py --device "$DEVICE" "${PRECISION_ARGS[@]}"
stage presets "$PYTHON" benchmarks/omniglot_runs.py --root "$ROOT" "${NO_CUDA[@]}" \
  --protocols alphabet --methods no --preset-timing --presets gpu_short \
  --timing-methods warp_leap,maml

if [[ ${#FAILED[@]} -gt 0 ]]; then
  echo "gpu_checks.sh on $DEVICE: FAILED stages: ${FAILED[*]}"
  exit 1
fi
echo "gpu_checks.sh on $DEVICE: every stage passed ($STAGES)"
