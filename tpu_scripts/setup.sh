#!/usr/bin/env bash
# Install the code and its environment on every worker of the slice. Safe to run again: the virtual environment is
# kept and pip only installs what changed.
#
#   NAME=cpt-7b ZONE=us-east5-a tpu_scripts/setup.sh
source "$(dirname "$0")/common.sh"

copy_code
on_all_workers "set -e
  command -v python3.11 >/dev/null || (sudo apt-get update -qq && sudo apt-get install -y -qq python3.11 python3.11-venv)
  [ -x ~/$REMOTE_VENV/bin/python ] || python3.11 -m venv ~/$REMOTE_VENV
  ~/$REMOTE_VENV/bin/pip install -q --upgrade pip
  ~/$REMOTE_VENV/bin/pip install -q -e ~/$REMOTE_DIR[tpu]
  ~/$REMOTE_VENV/bin/python -c 'import jax; print(jax.process_index(), jax.device_count(), jax.devices()[0].device_kind)'"
