#!/usr/bin/env bash
# GPU profiling of a pytest selection (the original profile_gpu.sh's modes).
#   scripts/profile_gpu.sh -m basic    [-o DIR] [-d SECONDS] -- <pytest args>   NVML sampling to DIR/nvml.csv
#   scripts/profile_gpu.sh -m nsight   [-o DIR] -- <pytest args>                Nsight Compute (ncu), clocks left alone
#   scripts/profile_gpu.sh -m timeline [-o DIR] [-d SECONDS] -- <pytest args>   Nsight Systems, else our Chrome trace
# Example: scripts/profile_gpu.sh -m basic -- benchmarks -m baseline --llm-batch-sizes 1
set -uo pipefail
cd "$(dirname "$0")/.."
mode=basic; out=results/profiles; dur=""
case "${1:-}" in -h|--help) sed -n '2,6p' "$0" | cut -c3-; exit 0 ;; esac
while getopts "m:o:d:" opt; do
  case $opt in
    m) mode=$OPTARG ;; o) out=$OPTARG ;; d) dur=$OPTARG ;;
    *) sed -n '2,6p' "$0" | cut -c3- >&2; exit 2 ;;
  esac
done
shift $((OPTIND - 1)); [ "${1:-}" = "--" ] && shift
[ $# -gt 0 ] || { echo "profile_gpu.sh: give the pytest arguments after --" >&2; exit 2; }
mkdir -p "$out"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
PYTEST=(python3 -m pytest "$@")
limit=(); [ -n "$dur" ] && limit=(timeout "$dur")
case $mode in
  basic)
    "${limit[@]}" python3 -m fixtures.nvml_log --out "$out/nvml.csv" -- "${PYTEST[@]}" ;;
  nsight)
    command -v ncu >/dev/null || { echo "profile_gpu.sh: ncu (Nsight Compute) is not installed here" >&2; exit 3; }
    # --clock-control none: measure the card as it is configured; never lock clocks on a shared machine.
    ncu --clock-control none --target-processes all --launch-count 200 -o "$out/ncu" "${PYTEST[@]}" ;;
  timeline)
    if command -v nsys >/dev/null; then
      nsys profile --trace cuda,nvtx,osrt ${dur:+--duration "$dur"} -o "$out/timeline" "${PYTEST[@]}"
    else
      echo "profile_gpu.sh: nsys (Nsight Systems) is not installed here: writing the suite's Chrome traces instead" >&2
      "${limit[@]}" "${PYTEST[@]}" --llm-enable-trace --llm-results-dir "$out"
    fi ;;
  *) echo "profile_gpu.sh: unknown mode '$mode' (basic, nsight, timeline)" >&2; exit 2 ;;
esac
