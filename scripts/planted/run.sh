#!/usr/bin/env bash
# Proves that tests/test_gpu_overlap.py catches a missing stream wait (issue 21): applies
# pipeline-missing-wait.patch to a throw-away copy of the tree, runs the GPU overlap test there, and
# reports the result. Exit 0: the test FAILED, as it must; 1: it passed (blind to the bug); 2: it could
# not say (the patch does not apply, nothing ran, the copy imported the wrong code).
# Usage: scripts/planted/run.sh [PYTEST ARGS]   default: -m gpu -k pipeline (2 GPUs)
# On CPU, `scripts/planted/run.sh -m "not gpu"` shows the bug passing there (exit 1: gloo is synchronous).
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
PATCH=$ROOT/scripts/planted/pipeline-missing-wait.patch
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
COPY=$(mktemp -d "${TMPDIR:-/tmp}/planted-missing-wait.XXXXXX") || exit 2
trap 'rm -rf "$COPY"' EXIT
say() { echo "planted missing wait: $*"; }

for p in overlap llm_bench fixtures tests conftest.py pytest.ini pyproject.toml; do
  cp -r "$ROOT/$p" "$COPY/" || { say "could not copy $p"; exit 2; }
done
find "$COPY" -name __pycache__ -prune -exec rm -rf {} +
# Outside any repository (a $TMPDIR inside one would make git apply skip the paths silently).
apply() { (cd "$COPY" && GIT_CEILING_DIRECTORIES=$(dirname "$COPY") git apply "$PATCH"); }
if ! apply || cmp -s "$ROOT/overlap/model.py" "$COPY/overlap/model.py"; then
  say "the patch does not apply to overlap/model.py: regenerate it (see its header)"; exit 2
fi
cd "$COPY" || exit 2
export PYTHONPATH=$COPY
where=$(python3 -c 'import overlap.model as m; print(m.__file__)') || exit 2
case $where in "$COPY"/*) ;; *) say "the copy imports overlap from $where, not from the copy"; exit 2 ;; esac

[ $# -gt 0 ] || set -- -m gpu -k pipeline
log=$COPY/pytest.log
python3 -m pytest tests/test_gpu_overlap.py -q -rfEs -p no:cacheprovider "$@" 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
summary=$(tail -n 1 "$log")
# Caught only when tests failed on the comparison itself (not a crash, not a setup error).
caught=$(grep -cE "^E +AssertionError: [a-z_]+: (max relative logit error|greedy tokens differ)" "$log")
if [ "$rc" -eq 1 ] && [ "$caught" -gt 0 ] && ! grep -q " error" <<<"$summary"; then
  say "FAILED as it must, $caught comparison(s) (${summary//=/})"; exit 0
elif [ "$rc" -eq 0 ] && grep -q " passed" <<<"$summary"; then
  say "PASSED: the test did not see the bug (${summary//=/})"; exit 1
fi
say "no verdict: pytest exit $rc (${summary//=/})"; exit 2
