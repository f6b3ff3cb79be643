#!/usr/bin/env bash
# The whole test suite, as the README and CI run it: the main suite (`-m "not vllm"`) and the vLLM suite (`-m vllm`,
# which needs `MEDIX_VLLM=1 scripts/setup.sh`) side by side, the main suite on one thread (OMP_NUM_THREADS=1; the
# vLLM suite pins its own). The vLLM suite waits on its server and its trainer in turn, so the two overlap well on two
# cores: 26 min side by side on 2026-12-07, where one after the other took 38 (experiments/perf/README.md). The main
# suite prints here, the vLLM suite's output (.venv/.test-logs/vllm.log) after it. Exits non-zero if either fails.
# Extra arguments go to both pytest runs (`scripts/test.sh -k guard`; a run they leave without tests counts as passed).
set -uo pipefail
cd "$(dirname "$0")/.."
logs=.venv/.test-logs
mkdir -p "$logs"
.venv/bin/python -m pytest -q -m vllm "$@" >"$logs/vllm.log" 2>&1 &
vllm_pid=$!
OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q -m "not vllm" "$@"
main_rc=$?
echo "medix: main suite (-m 'not vllm') exit $main_rc; waiting for the vLLM suite (-m vllm)"
wait "$vllm_pid"
vllm_rc=$?
cat "$logs/vllm.log"
echo "medix: vLLM suite (-m vllm) exit $vllm_rc"
ok() { [ "$1" = 0 ] || { [ "$1" = 5 ] && [ $# -gt 1 ]; }; }  # 5: pytest selected no test (with arguments)
ok "$main_rc" "$@" && ok "$vllm_rc" "$@"
