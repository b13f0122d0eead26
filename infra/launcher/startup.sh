#!/bin/bash
# jagpt training on a Cloud TPU VM: the startup script infra.launcher puts in each VM's metadata
# (key startup-script). It runs as root at boot on every host of the slice, and:
#   1. installs jagpt: from the wheel the launcher uploaded to the bucket (a Python 3.11+ venv in
#      /opt/jagpt, with jax[tpu]), or runs the training image instead when one is given;
#      with JAGPT_PREINSTALLED=1 in its environment it installs nothing and uses the `jagpt` on
#      PATH: for images with jagpt baked in, air-gapped hosts and the launcher's tests;
#   2. writes the run's config (carried inline below, also in launches/<id>/config.yaml);
#   3. runs `jagpt train --config ... --shards ...` (on a pod slice, jax.distributed joins the
#      hosts by itself); a SIGTERM (preemption, deletion) is passed on, so the run saves a
#      checkpoint and exits 75, and the next attempt resumes from it;
#   4. reports its start, then its exit status and the log, under launches/<id>/attempt-<n>/
#      in the storage root, where the launcher reads them.
# The placeholders are filled in by infra/launcher/tpu.py (render_startup_script).
set -uo pipefail

LAUNCH_ID=@@LAUNCH_ID@@
ATTEMPT=@@ATTEMPT@@
REPORT_PREFIX=@@REPORT_PREFIX@@      # launches/<id>/attempt-<n>, relative to the storage root
REPORT_URL=@@REPORT_URL@@            # the same as a gs:// URL (for reports before jagpt is installed)
WHEEL_URL=@@WHEEL_URL@@              # gs://.../jagpt-*.whl; empty with an image
IMAGE=@@IMAGE@@                      # a training image (infra/Dockerfile) instead of the wheel
JAX_SPEC=@@JAX_SPEC@@                # what pip installs for JAX next to the wheel
SHARDS=@@SHARDS@@                    # shards/<key>
CONFIG_B64=@@CONFIG_B64@@

metadata() {
  curl -sf -H 'Metadata-Flavor: Google' \
    "http://${GCE_METADATA_HOST:-metadata.google.internal}/computeMetadata/v1/instance/attributes/$1"
}
# The host's index in the slice: TPU VMs publish it as agent-worker-number.
WORKER="${TPU_WORKER_ID:-$(metadata agent-worker-number || echo 0)}"
log() { echo "jagpt-startup[$WORKER] $(date -u +%H:%M:%S) $*"; }

WORK="${JAGPT_WORKDIR:-/var/lib/jagpt}/$LAUNCH_ID-$ATTEMPT"
mkdir -p "$WORK" && cd "$WORK" || exit 1
echo "$CONFIG_B64" | base64 -d > config.yaml
: > train.log

PY=()      # the Python that has jagpt (for the reports)
JAGPT=()   # the jagpt command

# report started|finished [RC]: a small JSON (and, when finished, the log) under REPORT_PREFIX.
report() {
  if [ ${#PY[@]} -gt 0 ]; then
    "${PY[@]}" -m infra.launcher.vm report --config "$WORK/config.yaml" --prefix "$REPORT_PREFIX" \
      --worker "$WORKER" --event "$1" ${2:+--rc "$2"} --log "$WORK/train.log" && return 0
  fi
  # jagpt is not there (the install failed): gcloud, which TPU VM images have.
  if [ "$1" = finished ] && command -v gcloud >/dev/null; then
    gcloud storage cp "$WORK/train.log" "$REPORT_URL/worker-$WORKER.log" --quiet
    printf '{"worker": %s, "event": "finished", "rc": %s, "stage": "install"}\n' "$WORKER" "${2:-1}" \
      | gcloud storage cp - "$REPORT_URL/worker-$WORKER.json" --quiet
  fi
}

install() {
  if [ "${JAGPT_PREINSTALLED:-0}" = 1 ]; then
    local exe; exe=$(command -v jagpt) || { log "JAGPT_PREINSTALLED=1 but no jagpt on PATH"; return 1; }
    JAGPT=("$exe")
    PY=("$(sed -n '1s/^#!//p' "$exe")")   # the interpreter of the jagpt script
    log "using the preinstalled $exe"
  elif [ -n "$IMAGE" ]; then
    local registry="${IMAGE%%/*}"
    case "$registry" in *-docker.pkg.dev) gcloud auth configure-docker "$registry" --quiet ;; esac
    docker pull "$IMAGE" || return 1
    # Host network and devices: the TPU chips, the metadata server and the other hosts.
    local run=(docker run --rm --privileged --net=host -v "$WORK:$WORK" -w "$WORK")
    JAGPT=("${run[@]}" "$IMAGE")
    PY=("${run[@]}" --entrypoint python "$IMAGE")
    log "using the image $IMAGE"
  else
    local python
    python=$(command -v python3.13 || command -v python3.12 || command -v python3.11 || true)
    if [ -z "$python" ]; then
      log "installing Python 3.11 (the image has an older one)"
      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3.11 python3.11-venv \
        || return 1
      python=$(command -v python3.11)
    fi
    "$python" -m venv /opt/jagpt || return 1
    gcloud storage cp "$WHEEL_URL" "$WORK/" --quiet || return 1
    /opt/jagpt/bin/pip install --quiet --upgrade pip
    /opt/jagpt/bin/pip install --quiet "$WORK/${WHEEL_URL##*/}" "$JAX_SPEC" || return 1
    JAGPT=(/opt/jagpt/bin/jagpt)
    PY=(/opt/jagpt/bin/python)
    log "installed ${WHEEL_URL##*/} and $JAX_SPEC in /opt/jagpt"
  fi
}

log "launch $LAUNCH_ID attempt $ATTEMPT, worker $WORKER, in $WORK"
if ! install >>train.log 2>&1; then
  log "the install failed:"; tail -n 40 train.log
  report finished 3
  exit 3
fi
report started

# Training in the background, so a SIGTERM reaches this script's trap and is passed on.
"${JAGPT[@]}" train --config "$WORK/config.yaml" --shards "$SHARDS" >>train.log 2>&1 &
child=$!
trap 'log "SIGTERM: passing it on to jagpt train (it saves a checkpoint and exits 75)"; kill -TERM "$child" 2>/dev/null' TERM INT
while :; do
  wait "$child"
  rc=$?
  kill -0 "$child" 2>/dev/null || break   # wait was cut short by the trap: the child runs on
done
trap - TERM INT
log "jagpt train exited with status $rc"
tail -n 20 train.log
report finished "$rc"
exit 0
