#!/usr/bin/env bash
# Runs N copies of a command on this machine as one multi-process JAX job (the test bed for multi-host code).
#
#   launch/local_multiprocess.sh [-d DEVICES_PER_PROCESS] [-p PORT] N cmd [args...]
#   launch/local_multiprocess.sh -d 4 2 python -m r1jax.parallel.selftest --data 2 --expert 4
#
# Each process gets R1JAX_COORDINATOR_ADDRESS=127.0.0.1:PORT (a free port unless -p), R1JAX_NUM_PROCESSES=N,
# R1JAX_PROCESS_ID=i, JAX_PLATFORMS=cpu (unless already set) and its own DEVICES_PER_PROCESS fake CPU devices
# (XLA_FLAGS --xla_force_host_platform_device_count; default 1, or $R1JAX_DEVICES_PER_PROCESS). The program calls
# r1jax.parallel.initialize(), which reads those variables. Output lines are prefixed with "[i] ". The script
# waits for all processes and exits non-zero if any fails; when one fails the others are stopped, since they would
# otherwise wait for it in a collective until jax's timeouts.
set -euo pipefail

devices="${R1JAX_DEVICES_PER_PROCESS:-1}"
port=""
while getopts "d:p:h" opt; do
  case "$opt" in
    d) devices="$OPTARG" ;;
    p) port="$OPTARG" ;;
    h) sed -n '2,12p' "$0"; exit 0 ;;
    *) echo "usage: $0 [-d DEVICES_PER_PROCESS] [-p PORT] N cmd [args...]" >&2; exit 2 ;;
  esac
done
shift $((OPTIND - 1))
if [[ $# -lt 2 || ! "$1" =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: $0 [-d DEVICES_PER_PROCESS] [-p PORT] N cmd [args...]  (N: number of processes, got '${1:-}')" >&2
  exit 2
fi
if [[ ! "$devices" =~ ^[1-9][0-9]*$ ]]; then
  echo "$0: devices per process must be a positive integer, got '$devices'" >&2
  exit 2
fi
nproc="$1"
shift
if [[ -z "$port" ]]; then
  port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
fi

pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
}
trap 'cleanup; exit 130' INT TERM

for ((i = 0; i < nproc; i++)); do
  R1JAX_COORDINATOR_ADDRESS="127.0.0.1:$port" R1JAX_NUM_PROCESSES="$nproc" R1JAX_PROCESS_ID="$i" \
    JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}" \
    XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=$devices" \
    "$@" > >(sed -u "s/^/[$i] /") 2> >(sed -u "s/^/[$i] /" >&2) &
  pids+=("$!")
done

status=0
for ((left = nproc; left > 0; left--)); do
  # `wait -n` returns as soon as any process ends, so one failure stops the rest without waiting for them.
  set +e
  wait -n
  rc=$?
  set -e
  if ((rc != 0 && status == 0)); then
    status=$rc
    echo "local_multiprocess: a process exited with status $rc; stopping the others" >&2
    cleanup
  fi
done
wait  # the output prefixers
exit "$status"
