#!/usr/bin/env bash
# Installs the core and the chosen algorithm packages from this checkout, editable, with one
# command; run it again with another package to add it (the core is not rebuilt).
#
#   scripts/setup.sh                 every package, the pinned torch (requirements.txt) and the
#                                    experiments' requirements (the README's set-up)
#   scripts/setup.sh maml leap       the core and these packages only (torch>=2.4: whatever torch
#                                    is installed already is kept, e.g. a CPU-only build)
#   scripts/setup.sh --dev [...]     also the pinned torch and the test tools
#                                    (requirements-dev.txt)
#
# Packages: maml (MAML, FOMAML, ANIL, Meta-SGD, Reptile, iMAML), leap, warpgrad.
set -euo pipefail
cd "$(dirname "$0")/.."
known=(maml leap warpgrad)
dev=0
packages=()
for arg in "$@"; do
  case "$arg" in
    --dev) dev=1 ;;
    -h|--help) sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    maml|leap|warpgrad) packages+=("$arg") ;;
    *) echo "error: unknown argument '$arg'; give --dev and any of: ${known[*]}" >&2; exit 2 ;;
  esac
done
everything=0
if ((${#packages[@]} == 0)); then
  packages=("${known[@]}")
  everything=1
fi
if ((dev)); then
  python -m pip install --quiet -r requirements-dev.txt
elif ((everything)); then
  python -m pip install --quiet -r requirements.txt
fi
# The build backend once, into this environment: pip's default build isolation would install
# it into a fresh temporary environment for every package built (about 25 s each here).
# (editables: what hatchling's editable installs import at start-up.)
if ! python -c "import editables, hatchling" 2>/dev/null; then
  python -m pip install --quiet "hatchling>=1.26" "editables>=0.3"
fi
build=(--no-build-isolation)
# The core, once. Each algorithm package names the core by its path in this repository
# ("metazoo @ file:///.../src/metazoo", so that `pip install -e .` in its folder works alone),
# and pip rebuilds and reinstalls a path requirement on every install: the core again for every
# added package. So the core is installed here only when this checkout's editable core is
# missing, and the packages go in with --no-deps: their other requirements (torch, numpy) are
# the core's own, which tests/test_packaging.py checks.
core="$PWD/src/metazoo"
if ! python - "$core" <<'EOF'
import json, sys
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path
try:
    found = json.loads(distribution("metazoo").read_text("direct_url.json") or "{}")
except PackageNotFoundError:
    sys.exit(1)
url = found.get("url", "")
editable = found.get("dir_info", {}).get("editable", False)
sys.exit(0 if editable and url.startswith("file://")
         and Path(url[len("file://"):]).resolve() == Path(sys.argv[1]).resolve() else 1)
EOF
then
  python -m pip install --quiet "${build[@]}" -e src/metazoo
fi
editables=()
for package in "${packages[@]}"; do
  editables+=(-e "src/$package")
done
python -m pip install --quiet --no-deps "${build[@]}" "${editables[@]}"
if ((everything)); then
  for experiment in src/omniglot src/maze_navigation; do
    [[ -f "$experiment/requirements.txt" ]] && python -m pip install --quiet -r "$experiment/requirements.txt"
  done
fi
exit 0
