#!/usr/bin/env bash
# One GPU session's checks (issue 5, and issue 3's quality target on a GPU), as a single prepared script:
#   1. the machine and the software;  2. `bptt bench --device cuda --preset gpu`, plain and --graph (a quiet GPU);
#   3. PTB training runs side by side (one process each, under MPS when it starts) while
#      tests/test_cuda.py runs; each run is stopped with SIGTERM at TRAIN_UNTIL (it saves its state and
#      keeps its best-on-valid model), then evaluated on the test set (static, and dynamic at 5e-5).
# Env: RUNS_FILE (default benchmarks/gpu_runs/issue17_graph.txt, the next one to run; sweep1-3: issue 5, issue17: 2026-11-28), SKIP_BENCH=1, SKIP_TESTS=1, PROFILE=1 (gpu_profile.py),
#      SKIP_GRAPH_TRAIN=1 (the `bptt train --graph` timing),
#      SKIP_TORCHRUN=1 (the torchrun run, one rank per GPU, with --backend nccl: on one GPU a group of one,
#      whose all-reduce runs through NCCL), SKIP_PRESET=1 (the cell benches without the Elman tables), SKIP_DYNAMIC=1 (no dynamic
#      evaluation of the runs), WORK (default /tmp/gpu_check_work: the model directories that are not brought back).
# Usage: benchmarks/gpu_check.sh PTB_DIR OUT_DIR [TRAIN_UNTIL]   (run from the repository root)
# The training runs stop TRAIN_UNTIL seconds (default 470) after the script's start, so that the whole script
# ends within about TRAIN_UNTIL + 70 s (one device call).
# Everything lands in OUT_DIR: bench.jsonl, bench_graph.jsonl, test_cuda.log, summary.txt, runs.tar.gz.
set -u
PTB=$1; OUT=$2; TRAIN_UNTIL=${3:-470}
DEVICE=${DEVICE:-cuda}; PRESET=${PRESET:-gpu}  # DEVICE=cpu PRESET=layers: a dry run of the plumbing on a CPU
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 OMP_NUM_THREADS=2
# the LSTM's compiled CPU sweeps (engine/native.py) would be built first, ≈ 30 s of device time; the CPU
# machine tests them, so here the CPU side of the CUDA tests runs the eager code (BPTT_NATIVE_CPU=1 builds
# them). The LSTM's CUDA sweeps (Triton, cells/lstm_triton.py) stay on; BPTT_NATIVE=0 turns them off too.
export BPTT_NATIVE_CPU=${BPTT_NATIVE_CPU:-0}
WORK=${WORK:-/tmp/gpu_check_work}  # model directories of the timing runs: they stay on the device (files back are few)
mkdir -p "$OUT/runs" "$WORK"
{
  date; nvidia-smi -L; nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv
  python3 -c "import torch, safetensors, numpy, tqdm; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
  nproc
} > "$OUT/summary.txt" 2>&1

table() {  # a bench --json file -> one line per configuration in the summary
  python3 -c "
import json, sys
for line in open(sys.argv[1]):
    if line.startswith('{'):
        r = json.loads(line)
        print(f\"{r['config']:<28} bptt {r['bptt_tokens_per_s']:>12,.0f}  peer {r['peer_tokens_per_s']:>12,.0f}  {r['ratio']:.2f}x\")
    else:
        print(line.rstrip()[-300:])
" "$1" >> "$OUT/summary.txt" 2>&1
}
if [ -z "${SKIP_BENCH:-}" ]; then
  if [ -z "${SKIP_PRESET:-}" ]; then  # the Elman table against cuDNN (SKIP_PRESET=1: the cell benches only)
  echo "== bench $(date +%T)" >> "$OUT/summary.txt"
  timeout 120 python3 -m bptt bench --device $DEVICE --preset $PRESET --steps ${BENCH_STEPS:-100} --warmup 5 \
    --rounds 4 --json > "$OUT/bench.jsonl" 2>&1
  table "$OUT/bench.jsonl"
  if [ "$DEVICE" = cuda ]; then
    echo "== bench --graph $(date +%T)" >> "$OUT/summary.txt"
    timeout 120 python3 -m bptt bench --device cuda --preset gpu --graph --steps ${BENCH_STEPS:-100} --warmup 5 \
      --rounds 4 --json > "$OUT/bench_graph.jsonl" 2>&1
    table "$OUT/bench_graph.jsonl"
  fi
  fi
  if [ "$DEVICE" = cuda ]; then
    # the cells' Triton sweeps (cells/{lstm,gru}_triton.py) against their eager code, at the target shape,
    # with the graph (the runs below time the Triton sweeps; each record's machine field names them)
    for cell in lstm gru; do
      echo "-- $cell --graph, eager sweeps (BPTT_NATIVE=0)" >> "$OUT/bench_cells.jsonl"
      BPTT_NATIVE=0 timeout 120 python3 -m bptt bench --device cuda --cell $cell --layers 2 --graph \
        --config V=10000,m=650,B=64,T=35 --steps ${BENCH_STEPS:-100} --warmup 5 --rounds 4 --json >> "$OUT/bench_cells.jsonl" 2>&1
    done
    # issue 17: the LSTM and the GRU against cuDNN (goal >= 1x at V 10k, m 650, 2 layers, B 64, T 35)
    echo "== bench --cell lstm/gru --layers 2 $(date +%T)" >> "$OUT/summary.txt"
    for cell in lstm gru; do
      for g in "" --graph; do
        echo "-- $cell $g" >> "$OUT/bench_cells.jsonl"
        timeout 120 python3 -m bptt bench --device cuda --cell $cell --layers 2 $g \
          --config V=10000,m=650,B=64,T=35 --config V=10000,m=200,B=20,T=35 --steps ${BENCH_STEPS:-100} --warmup 5 \
          --rounds 4 --json >> "$OUT/bench_cells.jsonl" 2>&1
      done
    done
    table "$OUT/bench_cells.jsonl"
  fi
fi
[ -n "${PROFILE:-}" ] && timeout 60 python3 benchmarks/gpu_profile.py > "$OUT/profile.txt" 2>&1
if [ "$DEVICE" = cuda ] && [ -z "${SKIP_GRAPH_TRAIN:-}" ]; then  # issue 16: `bptt train --graph` against the plain step
  echo "== train --graph vs plain, 400 steps, V 10k m 200 B 32 T 35, Adam $(date +%T)" >> "$OUT/summary.txt"
  for g in "" "--graph"; do
    timeout 150 python3 -m bptt train --train "$PTB/ptb.train.txt" --valid "$PTB/ptb.valid.txt" --model "$WORK/graph$g" \
      --hidden 200 --batch 32 --bptt 35 --max-steps 400 --device cuda $g --quiet >> "$OUT/summary.txt" 2>&1
  done
fi
if [ "$DEVICE" = cuda ] && [ -z "${SKIP_TORCHRUN:-}" ]; then  # issue 18: the torchrun/NCCL path, one rank per GPU
  NGPU=$(python3 -c "import torch; print(torch.cuda.device_count())")
  echo "== torchrun --nproc-per-node $NGPU --backend nccl, 400 steps, V 10k m 200 B 32 T 35 $(date +%T)" >> "$OUT/summary.txt"
  NCCL_DEBUG=VERSION timeout 150 torchrun --standalone --nproc-per-node "$NGPU" -m bptt train --train "$PTB/ptb.train.txt" \
    --valid "$PTB/ptb.valid.txt" --model "$WORK/torchrun" --hidden 200 --batch 32 --bptt 35 --max-steps 400 \
    --device cuda --backend nccl --quiet >> "$OUT/summary.txt" 2>&1
  python3 -c "import json,sys; s=json.load(open(sys.argv[1])); print('torchrun state: step', s['global_step'], 'tokens', s['epoch_tokens'], 'seconds', round(s['epoch_seconds'],1))" \
    "$WORK/torchrun/checkpoint/config.json" >> "$OUT/summary.txt" 2>&1
fi

echo "== mps $(date +%T)" >> "$OUT/summary.txt"
export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps-pipe CUDA_MPS_LOG_DIRECTORY=/tmp/mps-log
mkdir -p $CUDA_MPS_PIPE_DIRECTORY $CUDA_MPS_LOG_DIRECTORY
MPS=off
if [ "$DEVICE" = cuda ] && command -v nvidia-cuda-mps-control >/dev/null && nvidia-cuda-mps-control -d 2>>"$OUT/summary.txt"; then
  if timeout 30 python3 -c "import torch; assert torch.ones(4, device='cuda').sum().item() == 4" 2>>"$OUT/summary.txt"; then
    MPS=on
  else
    echo quit | nvidia-cuda-mps-control; sleep 2
  fi
fi
echo "MPS $MPS" >> "$OUT/summary.txt"

TRAIN_FOR=$((TRAIN_UNTIL - SECONDS)); [ $TRAIN_FOR -lt 30 ] && TRAIN_FOR=30
echo "== training $(date +%T), $TRAIN_FOR s each" >> "$OUT/summary.txt"
nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv -l 10 > "$OUT/runs/gpu_util.csv" 2>&1 &
SMI=$!
COMMON="--train $PTB/ptb.train.txt --valid $PTB/ptb.valid.txt --device $DEVICE --bptt 35 --optimizer adam
        --min-improvement 1.001 --epochs 40 --quiet --seed 1"
declare -A RUNS=()
while IFS='|' read -r name options; do  # RUNS_FILE: "name | train options" per line, # comments
  name=$(echo $name); [ -z "$name" ] || [ "${name:0:1}" = "#" ] || RUNS[$name]=$options
done < "${RUNS_FILE:-benchmarks/gpu_runs/issue17_graph.txt}"
PIDS=()
for name in "${!RUNS[@]}"; do
  timeout -s TERM -k 20 "$TRAIN_FOR" python3 -m bptt train $COMMON ${RUNS[$name]} --model "$OUT/runs/$name" \
    > "$OUT/runs/$name.log" 2>&1 &
  PIDS+=($!)
done
[ "$DEVICE" = cuda ] && [ -z "${SKIP_TESTS:-}" ] && timeout $((TRAIN_FOR - 10)) python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_native.py > "$OUT/test_cuda.log" 2>&1
[ -f "$OUT/test_cuda.log" ] && tail -3 "$OUT/test_cuda.log" >> "$OUT/summary.txt"
wait "${PIDS[@]}"
kill $SMI 2>/dev/null

echo "== test-set evaluation $(date +%T)" >> "$OUT/summary.txt"
for name in "${!RUNS[@]}"; do
  timeout 45 python3 -m bptt eval --model "$OUT/runs/$name" --test "$PTB/ptb.test.txt" --device $DEVICE --json \
    > "$OUT/runs/$name.test.json" 2>&1 &
done
wait
[ -z "${SKIP_DYNAMIC:-}" ] && for name in "${!RUNS[@]}"; do  # rnnlm-style dynamic evaluation at the rate chosen on PTB valid (docs/results.md)
  timeout 120 python3 -m bptt eval --model "$OUT/runs/$name" --test "$PTB/ptb.test.txt" --device $DEVICE --json \
    --dynamic 5e-5 > "$OUT/runs/$name.dynamic.json" 2>&1 &
done
wait
for name in "${!RUNS[@]}"; do
  echo "-- $name: ${RUNS[$name]}" >> "$OUT/summary.txt"
  python3 - "$OUT/runs/$name" >> "$OUT/summary.txt" 2>&1 <<'PY'
import json, sys, pathlib
d = pathlib.Path(sys.argv[1])
t = 0.0
for line in (d / "metrics.jsonl").read_text().splitlines() if (d / "metrics.jsonl").exists() else []:
    r = json.loads(line)
    if "epoch" in r and "valid_perplexity" in r:
        t += r["seconds"]
        print(f"  epoch {r['epoch']:2d} lr {r['lr']:.3g} valid {r['valid_perplexity']:.2f} "
              f"{'ok ' if r['accepted'] else 'rej'} {r['seconds']:.1f}s (sum {t:.0f}s) {r['tokens_per_s']:.0f} tok/s")
p = pathlib.Path(str(d) + ".test.json")
print("  test:", p.read_text().strip()[-300:] if p.exists() else "none")
p = pathlib.Path(str(d) + ".dynamic.json")
print("  test, dynamic:", p.read_text().strip()[-300:] if p.exists() else "none")
PY
  tail -2 "$OUT/runs/$name.log" | cut -c1-300 >> "$OUT/summary.txt"
done
[ "$MPS" = on ] && echo quit | nvidia-cuda-mps-control
find "$OUT/runs" -name '*.safetensors' -delete
tar -C "$OUT" -czf "$OUT/runs.tar.gz" runs && rm -rf "$OUT/runs"
date >> "$OUT/summary.txt"
