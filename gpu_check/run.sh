#!/bin/sh
# The GPU check: `make gpu-check` (device=cpu to try it on a CPU); gpu_check/README.md.
# One iteration of DPO (LoRA and whole model) and PPO per model size with the transformers
# sampler, then the tests marked `cuda`. Runs with the project's .venv where there is one,
# else with python3 and the packages carried in .whl/ (a CUDA machine without a network).
set -e
cd "$(dirname "$0")/.."
device=${1:-auto}
copy_to=$2  # a folder to copy results.json into (the lent machine's $OUT)
if [ -x .venv/bin/python ]; then py=.venv/bin/python; else py=python3; fi
if ! $py -c "import hydra, omegaconf" 2>/dev/null; then
    if ! ls .whl/*.whl >/dev/null 2>&1; then
        echo "gpu-check: hydra-core is missing here and .whl/ holds no wheels: run" \
             "'make gpu-wheels' where pip reaches a registry and carry .whl/ along" >&2
        exit 2
    fi
    $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target .whl/site .whl/*.whl
    PYTHONPATH=$PWD/.whl/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
$py -m iterate.bench name=gpu-check gpu_check=true "ladder.device=$device"
[ -n "$copy_to" ] && cp runs/bench/gpu-check/results.json "$copy_to/"
status=0
$py -m pytest -q -m cuda -p no:cacheprovider tests || status=$?
[ "$status" -eq 5 ] && status=0  # no test selected
exit "$status"
