#!/usr/bin/env python3
"""Ours against PyTorch for the encoder's three shapes, alternating in one run.

For each round and each shape it runs `cascade bench-encoder --only MODE:B:S`
and `../shared/bench/pytorch_minilm.py MODEL MODE B S` one after the other
(each in its own process, 2 threads), then prints every round's medians, the
per-round ratio ours / PyTorch and the median of those ratios, with the CPU
model. Neither side runs while the other does, so the machine's drift over
the run hits both alike.

Setup of the PyTorch side (once, ~6 GB, not for CI), as the script's docstring says:
    python3 -m venv /tmp/torchref && /tmp/torchref/bin/pip install torch transformers tokenizers safetensors
Usage:
    scripts/bench/encoder_vs_pytorch.py --torch-python /tmp/torchref/bin/python [--rounds 3]
"""
import argparse
import re
import statistics
import subprocess
import sys
from pathlib import Path

SHAPES = ["fwd:16:256", "train:8:256", "fwd:1:128"]
ROOT = Path(__file__).resolve().parents[2]


def cpu_model():
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def cpu_flags():
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            return ", ".join(f for f in ["avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni"] if f in flags)
    return ""


def ours(binary, model, spec, iters, extra):
    out = subprocess.run([binary, "bench-encoder", "--only", spec, "--iters", str(iters), "--model", model, *extra],
                         check=True, capture_output=True, text=True).stdout
    fields = out.split()
    # mode batch seq median min max rss check
    return float(fields[3]), float(fields[6]), " ".join(fields[7:])


def pytorch(python, model, spec, iters):
    mode, batch, seq = spec.split(":")
    out = subprocess.run([python, str(ROOT.parent / "shared/bench/pytorch_minilm.py"), model, mode, batch, seq,
                          str(iters)], check=True, capture_output=True, text=True).stdout
    line = next(l for l in out.splitlines() if l.startswith("RESULT"))
    median = float(re.search(r"median_ms=([\d.]+)", line).group(1))
    rss = float(re.search(r"peak_rss_mb=([\d.]+)", line).group(1))
    check = line.split()[-1]
    return median, rss, check


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--torch-python", required=True, help="the Python that has torch and transformers")
    parser.add_argument("--binary", default=str(ROOT / "target/release/cascade"))
    parser.add_argument("--model", default=str(ROOT / "models/all-minilm-l6-v2"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated MODE:BATCH:SEQ")
    parser.add_argument("--ours-arg", action="append", default=[], help="extra argument for bench-encoder")
    args = parser.parse_args()
    shapes = args.shapes.split(",")
    rows = {s: {"torch": [], "ours": [], "rss": ([], [])} for s in shapes}
    print(f"CPU: {cpu_model()} ({cpu_flags()}), {args.rounds} alternating rounds, {args.iters} timed iterations each",
          flush=True)
    for r in range(args.rounds):
        for spec in shapes:
            t, t_rss, t_check = pytorch(args.torch_python, args.model, spec, args.iters)
            o, o_rss, o_check = ours(args.binary, args.model, spec, args.iters, args.ours_arg)
            rows[spec]["torch"].append(t)
            rows[spec]["ours"].append(o)
            rows[spec]["rss"][0].append(t_rss)
            rows[spec]["rss"][1].append(o_rss)
            print(f"round {r + 1} {spec:<12} pytorch {t:8.1f} ms  ours {o:8.1f} ms  ratio {o / t:.2f}"
                  f"  ({t_check} / {o_check})", flush=True)
    print()
    print("| shape | PyTorch ms | ours ms | ratio per round | median ratio | peak RSS PyTorch / ours MB |")
    print("|---|---|---|---|---|---|")
    for spec in shapes:
        t, o = rows[spec]["torch"], rows[spec]["ours"]
        ratios = [a / b for a, b in zip(o, t)]
        fmt = lambda xs: ", ".join(f"{x:.1f}" for x in xs)
        print(f"| {spec} | {fmt(t)} | {fmt(o)} | {', '.join(f'{x:.2f}' for x in ratios)} | "
              f"**{statistics.median(ratios):.2f}×** | {max(rows[spec]['rss'][0]):.0f} / {max(rows[spec]['rss'][1]):.0f} |")


if __name__ == "__main__":
    sys.exit(main())
