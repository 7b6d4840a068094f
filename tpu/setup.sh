#!/usr/bin/env bash
# Put the code on every TPU worker, install it in a venv, and check that JAX sees the TPUs.
set -euo pipefail
USAGE="Usage: tpu/setup.sh [options]

On ALL workers: get the code into ~/sftmix_jax (git clone REPO_URL at BRANCH, or, when
REPO_URL is empty, a tarball of this checkout: tracked and untracked, not ignored files),
create ~/sftmix_venv with uv (Python PYTHON_VERSION), pip install -e '.[tpu]', and print
jax.device_count() from every worker. Safe to rerun (e.g. after changing the code)."
# shellcheck source=tpu/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_args "$@"
((${#ARGS[@]} == 0)) || die "unknown argument: ${ARGS[0]} (see --help)"

if [[ -n $REPO_URL ]]; then
  fetch="rm -rf $REMOTE_REPO && git clone --depth 1 --branch $BRANCH $REPO_URL $REMOTE_REPO"
else
  tmp=/tmp/sftmix_jax.XXXXXX
  [[ $DRY_RUN == 1 ]] || { tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT; }
  tarball=$tmp/sftmix_jax.tar.gz
  echo "+ (cd $REPO_ROOT && git ls-files -co --exclude-standard | tar -czf $tarball -T -)"
  if [[ $DRY_RUN != 1 ]]; then
    git -C "$REPO_ROOT" ls-files -z -co --exclude-standard |
      while IFS= read -r -d '' f; do   # skip deleted files and local virtualenvs
        [[ ! -e $REPO_ROOT/$f || $f == .venv/* || $f == venv/* ]] || printf '%s\0' "$f"
      done | tar -C "$REPO_ROOT" -czf "$tarball" --null -T -
    echo "tarball: $(du -h "$tarball" | cut -f1)" >&2
  fi
  run gcloud compute tpus tpu-vm scp "$tarball" "$TPU_NAME:sftmix_jax.tar.gz" "${LOCATION[@]}" --worker=all
  fetch="rm -rf $REMOTE_REPO && mkdir -p $REMOTE_REPO && tar -xzf sftmix_jax.tar.gz -C $REMOTE_REPO"
fi

install="(command -v uv >/dev/null || curl -LsSf https://astral.sh/uv/install.sh | sh)"
install+=" && export PATH=\$HOME/.local/bin:\$PATH && cd $REMOTE_REPO"
install+=" && uv venv --allow-existing --python $PYTHON_VERSION $REMOTE_VENV"
install+=" && uv pip install --python $REMOTE_VENV/bin/python -e '.[tpu]'"
check="$REMOTE_VENV/bin/python -c 'import jax; print(\"worker\", jax.process_index(), \"devices\", jax.device_count(), \"local\", jax.local_device_count())'"

tpu_ssh all "set -e; $fetch; $install; $check"
echo "next: tpu/launch.sh --name $TPU_NAME CONFIG gs://BUCKET/DIR" >&2
