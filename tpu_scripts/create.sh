#!/usr/bin/env bash
# Create a Cloud TPU VM or pod slice through a queued resource and wait until it is ready.
#
#   NAME=cpt-7b ZONE=us-east5-a tpu_scripts/create.sh v5p-8          # accelerator type: v4-8, v5litepod-8, v5p-16, v6e-8 ...
#   SPOT=1 NAME=cpt-7b ZONE=us-east5-a tpu_scripts/create.sh v5p-16  # spot capacity
#
# The runtime image follows the TPU generation unless RUNTIME_VERSION is set. Delete the slice with
# `gcloud compute tpus queued-resources delete $NAME --zone $ZONE --force`.
source "$(dirname "$0")/common.sh"

TYPE=${1:?usage: create.sh ACCELERATOR_TYPE (e.g. v5p-8)}
case "$TYPE" in
  v4-*) DEFAULT_RUNTIME=tpu-ubuntu2204-base ;;
  v5litepod-*) DEFAULT_RUNTIME=v2-alpha-tpuv5-lite ;;
  v5p-*) DEFAULT_RUNTIME=v2-alpha-tpuv5 ;;
  v6e-*) DEFAULT_RUNTIME=v2-alpha-tpuv6e ;;
  *) echo "unknown accelerator type $TYPE; use v4-N, v5litepod-N, v5p-N or v6e-N" >&2; exit 2 ;;
esac
RUNTIME_VERSION=${RUNTIME_VERSION:-$DEFAULT_RUNTIME}

if gcloud compute tpus queued-resources describe "$NAME" --zone "$ZONE" --project "$PROJECT" >/dev/null 2>&1; then
  echo "queued resource $NAME already exists; waiting for it"
else
  gcloud compute tpus queued-resources create "$NAME" --node-id "$NAME" --zone "$ZONE" --project "$PROJECT" \
    --accelerator-type "$TYPE" --runtime-version "$RUNTIME_VERSION" ${SPOT:+--spot}
fi

while true; do
  state=$(gcloud compute tpus queued-resources describe "$NAME" --zone "$ZONE" --project "$PROJECT" \
    --format='value(state.state)')
  case "$state" in
    ACTIVE) echo "$NAME is ready"; break ;;
    FAILED|SUSPENDED) echo "queued resource $NAME is $state" >&2; exit 1 ;;
    *) echo "$(date +%T) $NAME is $state"; sleep 30 ;;
  esac
done
