#!/usr/bin/env bash
# Before renting a slice: compile every given config (default: the Qwen2.5-VL configs) for its `aot_topology` on this
# CPU host and fail if a program does not fit. Needs libtpu: pip install -e ".[tpu]" (no TPU is used).
#
#   tpu_scripts/aot_check.sh                                   # all configs/qwen2_5_vl_*.py
#   tpu_scripts/aot_check.sh configs/qwen2_5_vl_7b_rft.py --topology v5p:2x2x2 --config.rft.prompt_batch_size=4
set -euo pipefail
cd "$(dirname "$0")/.."

if [ $# -eq 0 ] || [[ "$1" == --* ]]; then
  configs=(configs/qwen2_5_vl_*.py)
else
  configs=("$1"); shift
fi
status=0
for config in "${configs[@]}"; do
  echo "== $config"
  JAX_PLATFORMS=cpu cpt-jax aot --config "$config" "$@" || status=1
done
exit $status
