"""`bptt bench`: training tokens/s of bptt next to torch.nn.RNN/LSTM/GRU + autograd on the same shapes in the
same run, the ratio and the peak memory (the measuring is in bptt.benchmark)."""

from __future__ import annotations

import argparse
import dataclasses
import json

import torch

from bptt import checks
from bptt.benchmark import (
    CELLS,
    DEFAULT_CONFIG,
    PRESETS,
    BenchConfig,
    bench_config,
    machine_info,
    machine_line,
    parse_config,
    table_header,
    table_row,
)
from bptt.engine import native
from bptt.engine.outputs import OUTPUT_LAYERS

EXAMPLES = """examples:
  bptt bench
  bptt bench --config V=10000,m=200,B=32,T=35 --config V=10000,m=500,B=64,T=35 --steps 50 --threads 1
  bptt bench --steps 60 --rounds 6       # alternate the sides: fairer on a machine shared with other work
  bptt bench --cell lstm --layers 2 --config V=10000,m=200,B=20,T=35 --steps 30 --rounds 6   # against nn.LSTM
  bptt bench --cell gru --layers 2 --config B=20                                             # against nn.GRU
  bptt bench --config out=class,C=100 --config out=hsm --config out=nce --config out=sampled
  bptt bench --config out=class,C=100,direct=2000000   # + maxent direct connections, 2M weights, order 3
  bptt bench --device cuda --config V=33278,m=650,B=20,T=35 --json
  bptt bench --device cuda --preset gpu --rounds 3     # issue 5's table, side by side with cuDNN
  bptt bench --device cuda --preset gpu --graph        # the same with bptt's step replayed as a CUDA graph
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", action="append", metavar="V=..,m=..,B=..,T=..",
        help=f"a configuration: V vocabulary, m hidden units, B streams, T block length (= BPTT steps), "
        f"out bptt's output layer ({'/'.join(OUTPUT_LAYERS)}; the peer always uses a full softmax), C classes "
        f"for out=class; repeatable; keys left out keep the default's value (default: {DEFAULT_CONFIG},out=softmax)",
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="a named set of configurations, before any --config: gpu = issue 5's six CUDA shapes "
                        "(use with --device cuda), layers = the five output layers at the default shape")
    parser.add_argument("--cell", choices=CELLS, default="elman",
                        help="the recurrent cell of both sides: elman (tanh; the peer torch.nn.RNN), lstm "
                        "(torch.nn.LSTM), gru (torch.nn.GRU); lstm and gru read words through an embedding of "
                        "size m on both sides (default: elman)")
    parser.add_argument("--layers", type=int, default=1, help="stacked recurrent layers of both sides (default: 1)")
    parser.add_argument("--steps", type=int, default=20, help="timed training steps per side (default: 20)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed warm-up steps per side (default: 3)")
    parser.add_argument(
        "--rounds", type=int, default=1,
        help="split the timed steps into R rounds that alternate between the sides (both models alive at "
        "once), so that a slow phase of a shared machine hits both; the table shows the per-round ratio "
        "range; peak memory then covers both models (default: 1, bptt's steps then the peer's)",
    )
    parser.add_argument(
        "--threads", type=int, default=None,
        help=f"torch.set_num_threads(N) (default: torch's default, here {torch.get_num_threads()})",
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where both sides run (default: cpu)")
    parser.add_argument(
        "--graph", action="store_true",
        help="with --device cuda: capture bptt's training step once as a CUDA graph and replay it (one launch "
        "instead of ≈ 300 per step; full softmax without direct connections); the peer is unchanged",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of both models' weights and of the token stream")
    parser.add_argument(
        "--json", action="store_true",
        help="one JSON object per configuration and line instead of the table; peak memory fields: "
        "bptt_/peer_peak_rss_mb on CPU (the process high-water mark: the peer's value includes "
        "bptt's, which runs first), bptt_/peer_cuda_max_allocated_mb on CUDA (torch.cuda.max_memory_allocated per side)",
    )


def _check_options(args: argparse.Namespace) -> torch.device:
    checks.positive_int("--steps", args.steps)
    checks.positive_int("--rounds", args.rounds)
    checks.integer("--layers", args.layers, 1, 64)
    checks.non_negative_int("--warmup", args.warmup)
    if args.threads is not None:
        checks.integer("--threads", args.threads, 1, 4096)
    device = checks.device(args.device)
    if args.graph and device.type != "cuda":
        raise ValueError("--graph needs --device cuda (CUDA graphs)")
    return device


def run(args: argparse.Namespace) -> int:
    device = _check_options(args)
    texts = [*(PRESETS[args.preset] if args.preset else []), *(args.config or [])]
    configs = [dataclasses.replace(parse_config(text), cell=args.cell, layers=args.layers)
               for text in (texts or [DEFAULT_CONFIG])]
    saved_threads = torch.get_num_threads()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    # fp32 on both sides: no TF32 in cuBLAS (bptt's products, the peer's Linear) nor in cuDNN (the peer's RNN)
    saved_tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        _bench_all(configs, args, device)
    finally:
        torch.set_num_threads(saved_threads)
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved_tf32
    return 0


def _bench_all(configs: list[BenchConfig], args: argparse.Namespace, device: torch.device) -> None:
    machine = machine_info(device)
    for cell in sorted({c.cell for c in configs} & {"lstm", "gru"}):  # what is timed: compiled sweeps or eager
        machine[f"{cell}_sweeps"] = native.describe(cell, device.type)
    if device.type == "cpu" and any(c.out == "softmax" for c in configs):  # the full softmax's loss pass
        machine["softmax_loss"] = native.describe("softmax")
    threads = torch.get_num_threads()
    width = max(len("config"), *(len(str(c)) for c in configs))
    if not args.json:
        print(machine_line(machine, device, threads, args.steps, args.warmup)
              + ("; bptt's step replayed as a CUDA graph" if args.graph else "")
              + "".join(f"; the {cell.upper()}'s sweeps {machine[f'{cell}_sweeps']}" for cell in ("lstm", "gru")
                        if f"{cell}_sweeps" in machine)
              + (f"; the softmax's loss and gradient {machine['softmax_loss']}" if "softmax_loss" in machine else ""))
        print(table_header(width, device), flush=True)
    for config in configs:
        record = bench_config(config, args.steps, args.warmup, args.seed, device, args.rounds, args.graph)
        if args.json:
            record.update(
                device=str(device), threads=threads, steps=args.steps, warmup=args.warmup, seed=args.seed,
                torch_version=torch.__version__, machine=machine,
            )
            print(json.dumps(record), flush=True)
        else:
            print(table_row(record, width, device), flush=True)
