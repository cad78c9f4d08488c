#!/usr/bin/env bash
# Runs one command on every worker of a Cloud TPU VM pod slice (one JAX process per worker host).
#
#   launch/tpu_pod.sh [--project P] [--workdir DIR] [--setup CMD] TPU_NAME ZONE -- cmd [args...]
#
#   launch/tpu_pod.sh --setup "pip install -e ." my-v5p-64 us-east5-a -- \
#       python -m r1jax.cli train experiments/r1_zero.py --config.mesh.fsdp=-1 --config.grpo.lr=1e-6
#
# Every argument after `--` is passed through verbatim (each one shell-quoted), so config overrides with spaces or
# quotes survive the ssh hop. On each worker the command runs in DIR (default ~/r1jax; the code must already be
# there, e.g. a git clone or a shared disk) after the optional setup command. r1jax.parallel.initialize() then
# calls jax.distributed.initialize(), which finds the pod's workers and coordinator itself. Extra gcloud flags
# (e.g. --internal-ip, --ssh-flag=...) go in $TPU_SSH_FLAGS. Exits with gcloud's status (non-zero if any worker
# fails).
set -euo pipefail

project=""
workdir="~/r1jax"
setup=""
usage="usage: $0 [--project P] [--workdir DIR] [--setup CMD] TPU_NAME ZONE -- cmd [args...]"
while [[ $# -gt 0 && "$1" == --* && "$1" != "--" ]]; do
  case "$1" in
    --project) project="$2"; shift 2 ;;
    --workdir) workdir="$2"; shift 2 ;;
    --setup) setup="$2"; shift 2 ;;
    --help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "$0: unknown option $1; $usage" >&2; exit 2 ;;
  esac
done
if [[ $# -lt 4 || "$3" != "--" ]]; then
  echo "$usage" >&2
  exit 2
fi
tpu="$1"
zone="$2"
shift 3

remote="$(printf '%q ' "$@")"
# The workdir may start with ~ (expanded remotely), so it is not quoted.
remote_cmd="set -e; cd $workdir; ${setup:+$setup; }$remote"
gcloud_args=(compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all --command "$remote_cmd")
if [[ -n "$project" ]]; then
  gcloud_args+=(--project "$project")
fi
# shellcheck disable=SC2206  # word splitting of the extra flags is intended
extra=(${TPU_SSH_FLAGS:-})
exec gcloud "${gcloud_args[@]}" "${extra[@]}"
