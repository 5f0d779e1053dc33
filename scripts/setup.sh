#!/usr/bin/env bash
# Installs the pinned torch and every package under src/ (editable). --dev adds test tools.
set -euo pipefail
cd "$(dirname "$0")/.."
requirements=requirements.txt
[[ "${1:-}" == "--dev" ]] && requirements=requirements-dev.txt
python -m pip install --quiet -r "$requirements"
# The algorithm packages name the core by its path ("metazoo @ file:///.../src/metazoo"), so the
# first call installs it, with every dependency, as a regular package. pip refuses that core and
# an editable one in the same call (ResolutionImpossible), so the editable core replaces it in a
# second call; its dependencies are installed by then.
python -m pip install --quiet -e src/maml -e src/leap -e src/warpgrad
python -m pip install --quiet --no-deps -e src/metazoo
for experiment in src/omniglot src/maze_navigation; do
  [[ -f "$experiment/requirements.txt" ]] && python -m pip install --quiet -r "$experiment/requirements.txt"
done
exit 0
