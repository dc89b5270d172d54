# Shared by the scripts in this directory: settings from the environment and helpers that talk to every worker.
# NAME (the slice), ZONE and PROJECT (default: gcloud's configured project) select the slice.

set -euo pipefail

: "${NAME:?set NAME to the TPU slice name, e.g. NAME=cpt-7b}"
: "${ZONE:?set ZONE to the slice zone, e.g. ZONE=us-east5-a}"
PROJECT=${PROJECT:-$(gcloud config get-value project 2>/dev/null)}
REMOTE_DIR=${REMOTE_DIR:-cpt-jax}        # the code, relative to the home directory on every worker
REMOTE_VENV=${REMOTE_VENV:-cpt-venv}     # its Python environment, likewise
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

# Run a shell command on every worker of the slice, in parallel, with the same arguments.
on_all_workers() {
  gcloud compute tpus tpu-vm ssh "$NAME" --zone "$ZONE" --project "$PROJECT" --worker=all --command "$1"
}

# Copy the tracked files of this checkout (plus uncommitted edits) to every worker, replacing the previous copy.
copy_code() {
  local archive
  archive=$(mktemp -t cpt-jax-XXXXXX.tar.gz)
  (cd "$REPO" && git ls-files -z --cached --others --exclude-standard | tar -czf "$archive" --null -T -)
  gcloud compute tpus tpu-vm scp "$archive" "$NAME:cpt-jax.tar.gz" --zone "$ZONE" --project "$PROJECT" --worker=all
  rm -f "$archive"
  on_all_workers "rm -rf ~/$REMOTE_DIR.new && mkdir -p ~/$REMOTE_DIR.new && tar -xzf ~/cpt-jax.tar.gz -C ~/$REMOTE_DIR.new \
    && rm -rf ~/$REMOTE_DIR && mv ~/$REMOTE_DIR.new ~/$REMOTE_DIR"
}
