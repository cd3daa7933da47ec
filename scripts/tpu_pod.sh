#!/bin/bash
# Training on a Cloud TPU pod slice (e.g. v4-32, v5p-64, v6e-64): the same command on every
# worker VM of the slice, through `gcloud compute tpus tpu-vm ssh --worker=all`.
#
#   TPU=my-v5p-64 ZONE=us-east5-a WORKDIR=gs://bucket/runs/125m scripts/tpu_pod.sh \
#       --config.data.source=tfds --config.data.tfds_name=c4/en:3.1.0 \
#       --config.data.data_dir=gs://bucket/tfds     # extra arguments go to python -m train
#
# Each worker finds the others through JAX's TPU detection (the VM metadata names the slice's
# workers and this one's index), so `python -m train` needs no cluster flags. The repository
# must be at $REPO on every worker, with Loom installed: run with SETUP=1 once to clone and
# `pip install -e ".[tpu]"` it there (REPO_URL says from where). WORKDIR must be a gs:// path
# (or a filesystem every worker mounts); re-running the same command resumes the run.
set -euo pipefail

: "${TPU:?set TPU to the TPU VM (slice) name}"
: "${ZONE:?set ZONE to its zone, e.g. us-east5-a}"
: "${WORKDIR:?set WORKDIR to a gs:// run directory}"
CONFIG=${CONFIG:-configs/gpt_125m.py}
REPO=${REPO:-\$HOME/loom}
PROJECT_FLAG=${PROJECT:+--project=$PROJECT}

run_everywhere() {
  # shellcheck disable=SC2086  # PROJECT_FLAG is empty or one word
  gcloud compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" $PROJECT_FLAG --worker=all \
      --command="$1"
}

if [[ "${SETUP:-0}" == "1" ]]; then
  : "${REPO_URL:?set REPO_URL to the git URL of this repository}"
  run_everywhere "set -e; [ -d $REPO ] || git clone $REPO_URL $REPO; cd $REPO && \
      pip install -q -e '.[tpu]'"
fi

args=$(printf ' %q' "$@")
run_everywhere "cd $REPO && python -m train --config $CONFIG --workdir $WORKDIR --no-progress $args"
