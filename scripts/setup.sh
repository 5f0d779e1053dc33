#!/usr/bin/env bash
# Installs the pinned torch and every package under src/ (editable). --dev adds test tools.
set -euo pipefail
cd "$(dirname "$0")/.."
requirements=requirements.txt
[[ "${1:-}" == "--dev" ]] && requirements=requirements-dev.txt
python -m pip install --quiet -r "$requirements"
# One pip call: the algorithm packages depend on the core "metazoo", which is on no registry,
# so pip must see the local core in the same resolution.
python -m pip install --quiet -e src/metazoo -e src/maml -e src/leap -e src/warpgrad
for experiment in src/omniglot src/maze_navigation; do
  [[ -f "$experiment/requirements.txt" ]] && python -m pip install --quiet -r "$experiment/requirements.txt"
done
exit 0
