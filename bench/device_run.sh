#!/usr/bin/env bash
# The one prepared GPU run (issue 17, docs/fp8.md "Measuring on a GPU"). On the device machine:
#   bash bench/device_run.sh              (writes $OUT/<phase>.json + device_run.log)
#   bash bench/device_run.sh --dry        (CPU, toy sizes; OUT defaults to /tmp/device_run_out)
# Extra arguments go to bench/device_run.py (--phases, --deadline).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 3
OUT="${OUT:-/tmp/device_run_out}"
if [[ " $* " != *" --dry "* ]]; then
  shopt -s nullglob
  wheels=(wheels/torchao-*.whl)
  if (( ${#wheels[@]} != 1 )); then
    echo "FATAL: need exactly one wheels/torchao-*.whl (found ${#wheels[@]}): download it with" >&2
    echo "  pip download torchao==0.18.0 --no-deps -d wheels/   and name wheels in the run's carry" >&2
    exit 3
  fi
  # --target keeps the image's environment untouched (docs of the device machine recommend it).
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "${wheels[0]}" \
    || { echo "FATAL: torchao wheel did not install" >&2; exit 3; }
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
  python3 -c "import torchao, torchao.float8; print('torchao', torchao.__version__)" \
    || { echo "FATAL: torchao.float8 does not import" >&2; exit 3; }
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv || true
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec python3 bench/device_run.py --out "$OUT" "$@"
