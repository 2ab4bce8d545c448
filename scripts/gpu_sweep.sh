#!/usr/bin/env bash
# One batch of GPU work for the device machine: smoke checks, then benchmark sweeps, results under
# $OUT (or ./gpu-out). Usage and stages: scripts/gpu_sweep.sh --help
STAGES="smoke baseline compile anatomy host-gap allreduce-bench prefill-bench gemv-tune attn-tune prefetch tp overlap
        tp-allreduce prefill-overlap decode-crossover overlap70 tp70 peer gate trace"
usage() {
  cat <<USAGE
usage: scripts/gpu_sweep.sh STAGE...      (results under \$OUT, default ./gpu-out)
stages, run in the order given:
  smoke            engines of every overlap mode and all-reduce (llama3-1b, TP=2), pytest tests -m gpu,
                   the overlap-modes logits check and its planted missing wait: start every GPU session here
  baseline         llama3-8b baseline, batches 1 and 16
  compile          the same without torch.compile / Triton attention, and both compared
  anatomy          where a TP=1 decode step's time goes, per engine variant (scripts/step_anatomy.py)
  host-gap         where the none loop's host turn-around between decode steps goes, TP 1 and 2
                   (scripts/host_gap.py)
  allreduce-bench  decode all-reduce paths at 1 and 16 rows (scripts/bench_allreduce.py)
  prefill-bench    one 8B layer's prefill at TP=2 per overlap variant (scripts/bench_prefill_overlap.py)
  gemv-tune        the batch-1 GEMV configurations per weight shape (scripts/tune_gemv.py, GEMV_TPS)
  attn-tune        the decode-attention kernel's keys per block x warps
  prefetch         --llm-prefetch-mb sweep of the prefetch mode
  tp               llama3-8b TP scaling with communication shares
  overlap          llama3-8b overlap modes at batches 1, 16, 64 (OVERLAP_TPS, default the largest TP here)
  tp-allreduce     llama3-8b TP 1 and 2 with --llm-allreduce symm, then lamport (the sixth session's A/B)
  prefill-overlap  none vs pipeline at batch 8 x prompt 1024, with communication shares
  decode-crossover none vs pipeline (forced) at batches 64, 128, 256
  overlap70, tp70  the same for llama3-70b
  peer             Hugging Face transformers on the same shapes (scripts/hf_peer.py)
  gate             two sessions of one commit (A/A) and one with CUDA graphs off, gated
  trace            traces, report and llm-bench trace of a TP 1/2 run
USAGE
}
case "${1:-}" in
  -h|--help) usage; exit 0 ;;
  "") usage >&2; exit 2 ;;
esac
for stage in "$@"; do
  case " $(echo $STAGES) " in *" $stage "*) ;; *) echo "gpu_sweep: unknown stage '$stage' (--help lists them)" >&2; exit 2 ;; esac
done
set -uo pipefail
cd "$(dirname "$0")/.."
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
PY=python3
NG=$($PY -c 'import torch; print(torch.cuda.device_count())')
TPS="1 2 4"; [ "$NG" -lt 4 ] && TPS="1 2"
B="$PY -m pytest benchmarks -q -p no:cacheprovider --llm-results-dir $OUT/results"
for stage in "$@"; do
  echo "=== $stage $(date -u +%T)"
  case $stage in
    smoke)
      nvidia-smi -L; $PY -c 'import torch; print(torch.__version__, torch.version.cuda, torch.cuda.nccl.version())'
      for m in ${SMOKE_MODES:-none prefetch pipeline double_buffer full}; do
        timeout 120 $PY -m overlap.generate --model llama3-1b --tp 2 --device cuda --batch-size 4 \
          --prompt-len 32 --max-tokens 16 --overlap $m | cut -c1-300
      done
      for ar in ${SMOKE_AR:-nccl symm lamport}; do
        timeout 120 $PY -m overlap.generate --model llama3-1b --tp 2 --device cuda --batch-size 4 \
          --prompt-len 32 --max-tokens 16 --allreduce $ar | cut -c1-300
      done
      # every overlap mode computes none's fp32 logits (2 GPUs), then the same test with a stream wait
      # removed from the pipeline schedule must fail (scripts/planted/run.sh: exit 0 = it failed)
      $PY -m pytest tests/test_gpu_overlap.py -m gpu -q -rs -s -p no:cacheprovider | tee $OUT/gpu-overlap.txt
      scripts/planted/run.sh | tee $OUT/planted-missing-wait.txt; echo "planted run exit ${PIPESTATUS[0]}"
      $PY -m pytest tests -m gpu -q -rs -p no:cacheprovider --ignore=tests/test_gpu_overlap.py ;;
    baseline) $B -m baseline --llm-model llama3-8b --llm-batch-sizes 1 16 --benchmark-json $OUT/baseline-8b.json ;;
    compile)  # the same baseline eager (no torch.compile, SDPA attention), then both side by side
      $B -m baseline --llm-model llama3-8b --llm-batch-sizes 1 16 --llm-no-compile --llm-decode-attention sdpa \
        --benchmark-json $OUT/baseline-8b-eager.json
      $PY -m llm_bench.cli compare $OUT/baseline-8b-eager.json $OUT/baseline-8b.json ;;
    anatomy)  # where a TP=1 decode step's time goes, per engine variant (scripts/step_anatomy.py)
      for v in "eager --decode-attention sdpa --gemv torch" "compile --decode-attention triton --gemv torch" \
               "compile --decode-attention triton --gemv triton --no-pdl" "compile --decode-attention triton --gemv triton"; do
        $PY scripts/step_anatomy.py --variant $v | tee -a $OUT/anatomy.jsonl | cut -c1-400
      done ;;
    host-gap)  # the none loop's host turn-around in parts (--pins: placements, see the script)
      timeout 500 $PY scripts/host_gap.py --tp 1 2 2>&1 | grep -v "NCCL INFO" | tee $OUT/host-gap.jsonl ;;
    allreduce-bench)  # decode all-reduce paths at 1 and 16 rows: NCCL, symm one-shot (+ norm), Lamport (+ fused norm)
      timeout 300 $PY scripts/bench_allreduce.py --tp 2 | tee $OUT/allreduce-bench.jsonl | tail -14 ;;
    prefill-bench)  # one 8B layer's prefill at TP=2: none, pipeline chunks (NCCL, capped CTAs, copy engine), async TP
      timeout 420 $PY scripts/bench_prefill_overlap.py --timeout-s 400 --json-out $OUT/prefill-overlap.jsonl \
        > $OUT/prefill-overlap.log 2>&1; grep -v 'NCCL INFO' $OUT/prefill-overlap.log | tail -60 ;;
    gemv-tune)  # the batch-1 GEMV kernel per weight shape: rows x columns per program x warps, beside Inductor and cuBLAS
      $PY scripts/tune_gemv.py --tp ${GEMV_TPS:-1 2} | tee $OUT/gemv-tune.jsonl | grep -E '"best"|configs' | cut -c1-300 ;;
    attn-tune)  # the decode-attention kernel alone: keys per block x warps, beside the SDPA path
      for b in 1 16; do $PY scripts/tune_decode_attention.py --batch $b | tee -a $OUT/attn-tune.jsonl | cut -c1-200; done ;;
    prefetch)  # how much of the next weight to pull into L2 per all-reduce (default half of L2 lost 5-6%)
      for mb in ${PREFETCH_MB:-2 4 8 16}; do
        $B -m overlap --llm-model llama3-8b --llm-tp-sizes ${OVERLAP_TPS:-2} --llm-batch-sizes 1 --llm-overlap-modes none prefetch \
          --llm-prefetch-mb $mb --llm-profile-communication --llm-num-runs 5 --llm-warmup-runs 2 --benchmark-json $OUT/prefetch-${mb}mb.json
      done ;;
    tp) $B -m tensor_parallel --llm-model llama3-8b --llm-tp-sizes $TPS --llm-batch-sizes 1 16 --llm-profile-communication \
          --benchmark-json $OUT/tp-8b.json ;;
    overlap) $B -m overlap --llm-model llama3-8b --llm-tp-sizes ${OVERLAP_TPS:-${TPS##* }} --llm-batch-sizes 1 16 64 \
          --llm-profile-communication --llm-num-runs 5 --llm-warmup-runs 2 --benchmark-json $OUT/overlap-8b.json ;;
    tp-allreduce) for ar in symm lamport; do
        $B -m "tensor_parallel or overlap" -k "not allreduce" --llm-model llama3-8b --llm-tp-sizes 1 2 \
          --llm-batch-sizes 1 16 --llm-overlap-modes none double_buffer --llm-allreduce $ar --llm-num-runs 7 \
          --llm-warmup-runs 2 --benchmark-json $OUT/tp-$ar.json | tail -14
      done ;;
    prefill-overlap) $B -k test_overlap --llm-model llama3-8b --llm-tp-sizes 2 --llm-batch-sizes 8 --llm-prompt-len 1024 \
          --llm-max-tokens 16 --llm-overlap-modes none pipeline --llm-profile-communication --llm-num-runs 7 \
          --llm-warmup-runs 2 --benchmark-json $OUT/prefill-overlap.json ;;
    decode-crossover) $B -k test_overlap --llm-model llama3-8b --llm-tp-sizes 2 --llm-batch-sizes 64 128 256 \
          --llm-overlap-modes none pipeline --llm-pipeline-min-batch 2 --llm-pipeline-min-tokens 1000000 \
          --llm-num-runs 5 --llm-warmup-runs 1 --benchmark-json $OUT/decode-crossover.json ;;
    tp70) $B -k "test_tensor_parallel" --llm-model llama3-70b --llm-tp-sizes ${TP70:-2 4} --llm-batch-sizes 1 16 \
          --llm-profile-communication --llm-num-runs 5 --llm-warmup-runs 2 --benchmark-json $OUT/tp-70b.json ;;
    overlap70) $B -m overlap --llm-model llama3-70b --llm-tp-sizes 4 --llm-batch-sizes 1 16 64 --llm-overlap-modes none prefetch pipeline full \
          --llm-profile-communication --llm-num-runs 3 --llm-warmup-runs 1 --benchmark-json $OUT/overlap-70b.json ;;
    peer) $PY scripts/hf_peer.py --model llama3-8b | tee $OUT/hf-peer.json ;;
    gate)  # three sessions of one commit (two baselines and an A/A candidate) and a real slowdown (no graphs)
      G="$B -m baseline --llm-model llama3-8b --llm-batch-sizes 1 --llm-num-runs 10"
      for s in a1 a2 a3; do $G --benchmark-json $OUT/gate-$s.json | tail -1; done
      $G --llm-no-cuda-graphs --benchmark-json $OUT/gate-slow.json | tail -1
      $PY -m llm_bench.cli gate --baseline $OUT/gate-a1.json $OUT/gate-a2.json --candidate $OUT/gate-a3.json
      echo "A/A exit $?"
      $PY -m llm_bench.cli gate --baseline $OUT/gate-a1.json $OUT/gate-a2.json --candidate $OUT/gate-slow.json
      echo "slowdown exit $?" ;;
    trace)
      R=$(mktemp -d)
      $PY -m pytest benchmarks -q -p no:cacheprovider -m "tensor_parallel or overlap" -k "not allreduce" \
        --llm-model llama3-8b --llm-tp-sizes 1 2 --llm-batch-sizes 1 --llm-overlap-modes none double_buffer --llm-num-runs 5 \
        --llm-warmup-runs 2 --llm-enable-trace --llm-profile-communication --llm-results-dir $R --benchmark-json $OUT/trace-run.json
      $PY -m llm_bench.cli report $OUT/trace-run.json --out $R/report
      $PY -m llm_bench.cli trace $R/traces/test_*.json | tee $OUT/trace-summary.txt
      tar -czf $OUT/report-and-traces.tar.gz -C $R report traces ;;
  esac
done
echo "=== done $(date -u +%T)"
