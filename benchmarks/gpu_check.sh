#!/usr/bin/env bash
# The prepared GPU check (issue 24): the first command a session lent a GPU runs, from the
# repository root, in one device call of at most 8 minutes (see benchmarks/gpu_check.py):
#
#   bash benchmarks/gpu_check.sh
#
# Results: $OUT/gpu_check.json and $OUT/gpu_check.md (OUT unset: benchmarks/results/), and
# the "GPU check" section of BENCHMARKS.md in this tree. On the device machine only $OUT
# comes back; write its section into BENCHMARKS.md here with
#   python -m benchmarks.gpu_check --render-from <files_at>/gpu_check.json --benchmarks BENCHMARKS.md
# Extra arguments go to the module (e.g. --only attention,train --total-s 300).
set -u
cd "$(dirname "$0")/.."
root=$(pwd)
py=${PYTHON:-python}
if [ -x "$root/.venv/bin/python" ]; then py="$root/.venv/bin/python"; fi
export PYTHONPATH="$root:$root/kernels:$root/launch:$root/conf${PYTHONPATH:+:$PYTHONPATH}"
out_dir=${OUT:-$root/benchmarks/results}
mkdir -p "$out_dir"
"$py" -c "import torch; print('gpu_check: torch', torch.__version__, 'cuda', torch.cuda.is_available())"
exec "$py" -m benchmarks.gpu_check --json "$out_dir/gpu_check.json" --md "$out_dir/gpu_check.md" \
    --benchmarks "$root/BENCHMARKS.md" "$@"
