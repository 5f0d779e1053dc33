#!/usr/bin/env bash
# Omniglot experiment setup: -p install packages, -d get the data, -l make the log folders.
#
#   bash make_omniglot.sh -pdl                                    # online: official archives
#   bash make_omniglot.sh -pdl --source ../shared/data/omniglot   # offline: local archives
#   OMNIGLOT_SOURCE=../shared/data/omniglot bash make_omniglot.sh -d
#
# Options:
#   -p              install the pinned torch, the core, the algorithm packages and the experiments'
#                   requirements (scripts/setup.sh)
#   -d              get the archives (download, or copy from --source) and extract them: the
#                   alphabets into ROOT/omniglot, Lake et al.'s one-shot benchmark
#                   (all_runs.zip: run01..run20) into ROOT_oneshot, beside ROOT (main.py
#                   takes every alphabet-like folder under ROOT, runNN/ included)
#   -l              create the log folder
#   --source DIR    folder of Omniglot .zip archives to use instead of the network
#                   (env OMNIGLOT_SOURCE; on our machines ../shared/data/omniglot); its
#                   all_runs.zip, when present, is the one-shot benchmark (when absent, the
#                   benchmark is not installed and a note says how to get it)
#   --root DIR      where the data go (env OMNIGLOT_ROOT, default data; main.py --root)
#   --log_dir DIR   log folder (env OMNIGLOT_LOG_DIR, default logs; main.py --log_dir)
#
# Checksums: the two small archives that ship on our machines are pinned below, and nothing
# overrides a pinned checksum. Other archives are verified against a SHA256SUMS file next to
# them (in --source, or downloaded into the archive folder by you: ROOT/omniglot,
# ROOT_oneshot) when it lists them, else used with a warning that they were not verified.
# Every archive is verified and checked (a readable zip, safe entry names, no links, at most
# OMNIGLOT_MAX_EXTRACT_MB megabytes unpacked, default 2048) before any is extracted.
set -euo pipefail
cd "$(dirname "$0")"

URL=${OMNIGLOT_URL:-https://raw.githubusercontent.com/brendenlake/omniglot/master/python}
ARCHIVES=(images_background.zip images_evaluation.zip)
ONESHOT=all_runs.zip  # one-shot-classification/ in the dataset repository
declare -A PINNED=(
  [images_background_small1.zip]=f38eb80f801274ac2b4dff5b24289016bfaba4a7d5bb50deebf27104ad6cb8a4
  [images_background_small2.zip]=3ccaa407515a8778e5d0861875af38b17e418f301ad5bb3b5a6b65d901a41c7f
)

SOURCE=${OMNIGLOT_SOURCE:-}
ROOT=${OMNIGLOT_ROOT:-data}
LOG_DIR=${OMNIGLOT_LOG_DIR:-logs}
INSTALL=0 DATA=0 LOGS=0

usage() { sed -n '2,25p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }
die() { echo "make_omniglot.sh: $*" >&2; exit 2; }  # one line naming what and the fix

while [[ $# -gt 0 ]]; do
  case $1 in
    --source) [[ $# -ge 2 ]] || die "--source needs a folder"; SOURCE=$2; shift 2 ;;
    --source=*) SOURCE=${1#*=}; shift ;;
    --root) [[ $# -ge 2 ]] || die "--root needs a folder"; ROOT=$2; shift 2 ;;
    --root=*) ROOT=${1#*=}; shift ;;
    --log_dir) [[ $# -ge 2 ]] || die "--log_dir needs a folder"; LOG_DIR=$2; shift 2 ;;
    --log_dir=*) LOG_DIR=${1#*=}; shift ;;
    -h|--help) usage 0 ;;
    -*)
      flags=${1#-}
      [[ -n $flags && $flags =~ ^[pdl]+$ ]] || { echo "unknown option $1" >&2; usage 2; }
      [[ $flags == *p* ]] && INSTALL=1
      [[ $flags == *d* ]] && DATA=1
      [[ $flags == *l* ]] && LOGS=1
      shift ;;
    *) echo "unexpected argument $1" >&2; usage 2 ;;
  esac
done
[[ $INSTALL$DATA$LOGS != 000 ]] || usage 2

sha256() { python - "$1" <<'EOF'
import hashlib, sys
h = hashlib.sha256()
with open(sys.argv[1], "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
        h.update(chunk)
print(h.hexdigest())
EOF
}

verify() {  # verify ARCHIVE [SUMS_FILE]: a pinned checksum wins over any SHA256SUMS entry
  local file=$1 sums=${2:-} name expected listed="" from actual
  name=$(basename "$file")
  if [[ -n $sums && -f $sums ]]; then
    listed=$(awk -v n="$name" '$2 == n || $2 == "*"n {print $1; exit}' "$sums")
  fi
  expected=${PINNED[$name]:-} from="pinned in make_omniglot.sh, which no SHA256SUMS overrides"
  [[ -z $expected ]] && expected=$listed from="listed in $sums"
  if [[ -z $expected ]]; then
    echo "warning: no checksum known for $name (no SHA256SUMS entry, not pinned): not verified" >&2
    return 0
  fi
  actual=$(sha256 "$file")
  [[ $actual == "$expected" ]] || die "checksum mismatch for $file: got $actual, expected $expected ($from); get the official archive again"
  if [[ -n $listed && $listed != "$expected" ]]; then
    echo "warning: $sums lists another checksum for $name than the pinned one, which it matches" >&2
  fi
  echo "verified $name (sha256 $actual)"
}

unzip_py() {  # unzip_py check|extract ARCHIVE [DEST]: one error line and exit 2 on a bad archive
  python - "$@" <<'EOF'
import os, stat, sys, zipfile
mode, archive = sys.argv[1], sys.argv[2]
dest = os.path.realpath(sys.argv[3] if len(sys.argv) > 3 else ".")
limit_mb = int(os.environ.get("OMNIGLOT_MAX_EXTRACT_MB") or 2048)
def fail(message):
    print(f"make_omniglot.sh: {message}", file=sys.stderr)
    sys.exit(2)
try:
    z = zipfile.ZipFile(archive)
except (zipfile.BadZipFile, OSError) as err:
    fail(f"{archive} is not a readable zip archive ({err}); get the official archive again")
with z:
    infos = z.infolist()
    files = {i.filename for i in infos if not i.is_dir()}
    for info in infos:
        name = info.filename
        parts = name.replace("\\", "/").split("/")
        target = os.path.realpath(os.path.join(dest, name))
        if name.startswith(("/", "\\")) or ".." in parts or (len(name) > 1 and name[1] == ":") \
                or not (target == dest or target.startswith(dest + os.sep)):
            fail(f"refusing unsafe archive entry {name!r} in {archive}")
        if stat.S_ISLNK(info.external_attr >> 16):
            fail(f"refusing link entry {name!r} in {archive}: Omniglot archives hold files only")
        if any("/".join(parts[:k]) in files for k in range(1, len(parts))):
            fail(f"refusing archive entry {name!r} in {archive}: it lies under a file entry")
    total = sum(i.file_size for i in infos)
    if total > limit_mb * 2**20:
        fail(f"{archive} would unpack to {total / 2**20:.0f} MB, more than the limit of "
             f"{limit_mb} MB; not an Omniglot archive (raise OMNIGLOT_MAX_EXTRACT_MB if it is)")
    try:
        bad = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, NotImplementedError) as err:
        bad = f"? ({err})"
    if bad is not None:
        fail(f"{archive} is corrupt (entry {bad} fails its check); get the official archive "
             "again")
    if mode == "extract":
        try:
            z.extractall(dest)
        except OSError as err:
            fail(f"cannot extract {archive} into {dest}: {err}")
        print(f"extracted {archive} -> {dest}")
EOF
}
check_archive() { unzip_py check "$1"; }
extract() { unzip_py extract "$1" "$2"; }

if [[ $INSTALL == 1 ]]; then
  # setup.sh knows the order pip needs (the algorithm packages name the core by its path, and
  # pip refuses that and an editable core in one call).
  bash scripts/setup.sh
  echo "installed torch, metazoo, maml, leap, warpgrad and the experiments' requirements"
fi

if [[ $DATA == 1 ]]; then
  mkdir -p "$ROOT/omniglot"
  if [[ -n $SOURCE ]]; then
    [[ -d $SOURCE ]] || die "--source $SOURCE is not a folder of Omniglot .zip archives"
    shopt -s nullglob
    zips=()
    for z in "$SOURCE"/*.zip; do  # all_runs.zip is the benchmark, not alphabets (below)
      [[ $(basename "$z") == "$ONESHOT" ]] || zips+=("$z")
    done
    shopt -u nullglob
    [[ ${#zips[@]} -gt 0 ]] || die "no Omniglot alphabet .zip archives in $SOURCE"
    for z in "${zips[@]}"; do  # every archive checked before any is extracted
      verify "$z" "$SOURCE/SHA256SUMS"
      check_archive "$z"
    done
    if [[ -f $SOURCE/$ONESHOT ]]; then
      verify "$SOURCE/$ONESHOT" "$SOURCE/SHA256SUMS"
      check_archive "$SOURCE/$ONESHOT"
    fi
    for z in "${zips[@]}"; do
      extract "$z" "$ROOT/omniglot"
    done
  else
    for name in "${ARCHIVES[@]}"; do
      dest="$ROOT/omniglot/$name"
      if [[ ! -f $dest ]]; then
        echo "downloading $URL/$name"
        if ! curl -fsSL --connect-timeout 10 --max-time 600 -o "$dest.part" "$URL/$name"; then
          rm -f "$dest.part"
          die "cannot download $URL/$name (no network?). Point at local archives instead:
  bash make_omniglot.sh -d --source ../shared/data/omniglot
or set OMNIGLOT_SOURCE=../shared/data/omniglot (any folder of Omniglot .zip archives)."
        fi
        mv "$dest.part" "$dest"
      fi
      verify "$dest" "$ROOT/omniglot/SHA256SUMS"
      check_archive "$dest"
    done
    for name in "${ARCHIVES[@]}"; do
      extract "$ROOT/omniglot/$name" "$ROOT/omniglot"
    done
  fi
  echo "data in $ROOT/omniglot (main.py --root $ROOT)"

  # Lake et al.'s one-shot benchmark: optional, and kept outside $ROOT: data.find_alphabets
  # walks all of $ROOT (main.py --root) and would take each runNN/ for an alphabet.
  ONESHOT_DIR=${ROOT%/}_oneshot
  oneshot_note() {
    echo "note: the one-shot benchmark data ($ONESHOT, Lake et al. 2015) was NOT installed ($1); only evaluate_oneshot.py needs it: put $URL/one-shot-classification/$ONESHOT into the --source folder, or re-run with network access" >&2
  }
  oneshot_zip=""
  if [[ -n $SOURCE ]]; then
    if [[ -f $SOURCE/$ONESHOT ]]; then
      oneshot_zip=$SOURCE/$ONESHOT  # verified and checked above, with the alphabets
    else
      oneshot_note "there is no $ONESHOT in $SOURCE"
    fi
  else
    mkdir -p "$ONESHOT_DIR"
    dest=$ONESHOT_DIR/$ONESHOT
    if [[ ! -f $dest ]]; then
      echo "downloading $URL/one-shot-classification/$ONESHOT"
      if curl -fsSL --connect-timeout 10 --max-time 600 -o "$dest.part" \
          "$URL/one-shot-classification/$ONESHOT"; then
        mv "$dest.part" "$dest"
      else
        rm -f "$dest.part"
        rmdir "$ONESHOT_DIR" 2>/dev/null || true  # leave no empty benchmark folder behind
        oneshot_note "cannot download $URL/one-shot-classification/$ONESHOT"
      fi
    fi
    if [[ -f $dest ]]; then
      oneshot_zip=$dest
      verify "$oneshot_zip" "$ONESHOT_DIR/SHA256SUMS"
      check_archive "$oneshot_zip"
    fi
  fi
  if [[ -n $oneshot_zip ]]; then
    extract "$oneshot_zip" "$ONESHOT_DIR"
    echo "one-shot runs in $ONESHOT_DIR (evaluate_oneshot.py --root $ROOT, or --runs DIR)"
  fi
fi

if [[ $LOGS == 1 ]]; then
  mkdir -p "$LOG_DIR"
  echo "log folder $LOG_DIR (main.py --log_dir $LOG_DIR)"
fi
