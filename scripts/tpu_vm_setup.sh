#!/usr/bin/env bash
# Installs this repository and JAX for TPU on every worker of a Cloud TPU VM.
#
#   scripts/tpu_vm_setup.sh TPU_NAME ZONE [REMOTE_DIR]
#
# Run from a git checkout on a machine with gcloud set up for the project. The commit at
# HEAD (not uncommitted changes: commit first) travels as a git bundle, so every worker
# gets ~/REMOTE_DIR (default rain_jax) as a git checkout of exactly that commit and the
# runs record it in <output>.config.json. Then, on all workers at once:
#   python3 -m pip install -e "./REMOTE_DIR[tpu]" jax==0.10.2 jaxlib==0.10.2
# rain_jax, its requirements and the versions the project was tested with: jax and
# jaxlib pinned here (JAX_VERSION), libtpu by setup.cfg's [tpu] extra (libtpu==0.0.42.1,
# the wheel jax 0.10.2 pins; all three from PyPI); the workers then check that
# `import jax` reports JAX_VERSION. Running it again updates the checkout to the new
# HEAD and reinstalls.
# Weights are not copied: put them on the workers (or a bucket mounted there) and pass
# --checkpoint_root to scripts/sweep.py. Environment: PYTHON (default python3) is the
# workers' interpreter.
set -euo pipefail

if [[ $# -lt 2 || $# -gt 3 ]]; then
  echo "usage: $0 TPU_NAME ZONE [REMOTE_DIR]" >&2
  exit 2
fi
tpu_name=$1
zone=$2
remote_dir=${3:-rain_jax}
python=${PYTHON:-python3}
# The JAX the project was tested with (setup.cfg's [tpu] extra pins the matching libtpu).
JAX_VERSION=0.10.2
if [[ ! $remote_dir =~ ^[A-Za-z0-9_.-]+$ ]]; then
  echo "$0: REMOTE_DIR must be a plain folder name under the home folder, got '$remote_dir'" >&2
  exit 2
fi

repo=$(cd "$(dirname "$0")/.." && pwd)
commit=$(git -C "$repo" rev-parse HEAD)
if [[ -n $(git -C "$repo" status --porcelain --untracked-files=no) ]]; then
  echo "$0: warning: uncommitted changes are not copied; the workers get $commit" >&2
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
bundle=$work/$remote_dir.bundle
git -C "$repo" bundle create "$bundle" HEAD 2>/dev/null

echo "Copying commit $commit to every worker of $tpu_name ..." >&2
gcloud compute tpus tpu-vm scp "$bundle" "$tpu_name:" --zone="$zone" --worker=all

# Runs on each worker, in its home folder.
remote_script="set -euo pipefail
if [ -d $remote_dir/.git ]; then
  git -C $remote_dir fetch -q ../$remote_dir.bundle HEAD
  git -C $remote_dir checkout -q --detach FETCH_HEAD
else
  git -c advice.detachedHead=false clone -q $remote_dir.bundle $remote_dir
  git -C $remote_dir checkout -q --detach $commit
fi
test \"\$(git -C $remote_dir rev-parse HEAD)\" = $commit
$python -m pip install -q -e './$remote_dir[tpu]' jax==$JAX_VERSION jaxlib==$JAX_VERSION
$python -c 'import importlib.metadata as m, jax, rain_jax; assert jax.__version__ == \"$JAX_VERSION\", jax.__version__; print(\"rain_jax ready: jax\", jax.__version__, \"libtpu\", m.version(\"libtpu\"))'"

echo "Installing on every worker of $tpu_name ..." >&2
gcloud compute tpus tpu-vm ssh "$tpu_name" --zone="$zone" --worker=all \
  --command="$remote_script"
echo "Done: ~/$remote_dir on every worker of $tpu_name is at $commit." >&2
