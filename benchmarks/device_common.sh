# Sourced by the device_*.sh scripts: repository root, import path, and `bench LIMIT SCRIPT ARGS...` (one step with
# its own time limit, its exit status logged), `device_info` (the GPU, driver, clocks and jax versions).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
bench() { timeout "$1" python3 "benchmarks/$2" "${@:3}"; echo "exit $? for: ${*:2}"; }
device_info() {
  date -u
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,memory.total --format=csv
  python3 -c "import jax, jaxlib; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, jax.devices())"
}
