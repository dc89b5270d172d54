#!/usr/bin/env bash
# Copy this checkout to every worker and start the same command on all of them (multi-controller JAX: each worker
# runs the same program on its own devices and data shard; `--config.distributed=True` connects them).
#
#   NAME=cpt-7b ZONE=us-east5-a tpu_scripts/launch.sh cpt-jax train --config configs/qwen2_5_vl_7b_rft.py \
#       --workdir gs://BUCKET/runs/7b_rft --config.distributed=True \
#       --config.model.hf_dir=/path/on/workers --config.data.data_dir=gs://BUCKET/tfds
#
# Output goes to ~/run.log on each worker (worker 0 writes the logs and reports); follow it with
#   gcloud compute tpus tpu-vm ssh $NAME --zone $ZONE --worker=0 --command 'tail -f ~/run.log'
source "$(dirname "$0")/common.sh"

[ $# -gt 0 ] || { echo "usage: launch.sh COMMAND [ARGS...]" >&2; exit 2; }
printf -v COMMAND '%q ' "$@"

copy_code
# A previous run still holding the TPU would make the new one fail to start: stop it (by its recorded pid) first.
on_all_workers "if [ -f ~/run.pid ]; then kill \$(cat ~/run.pid) 2>/dev/null && sleep 5; rm -f ~/run.pid; fi
  cd ~/$REMOTE_DIR && source ~/$REMOTE_VENV/bin/activate
  nohup $COMMAND > ~/run.log 2>&1 < /dev/null & echo \$! > ~/run.pid"
echo "started on every worker of $NAME: $COMMAND"
