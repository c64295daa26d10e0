"""Time per item of an LR -> LLM cascade driven from Python against the CLI.

The IMDB test stream (12,500 items) with the recorded GPT-3.5 answers, the
config configs/imdb-lr.toml, as `cascade bench` replays it. Each way is timed
from reading the stream to the last decision, in alternating rounds; the
table gives medians and the ratio to the CLI. Run from the repository root
after `pip install ./crates/cascade-py` and `cargo build --release`:

    python crates/cascade-py/bench/overhead.py [--rounds 3] [--data ../shared/data/imdb]
"""

import argparse
import platform
import re
import statistics
import subprocess
import time

import cascade_stream as cs


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def cli(args):
    out = subprocess.run(
        ["target/release/cascade", "bench", "--data", args.data, "--config", args.config],
        check=True, capture_output=True, text=True,
    ).stdout
    calls = int(re.search(r"(\d+) LLM calls", out).group(1))
    return float(re.search(r"wall time: ([0-9.]+) s", out).group(1)), calls


def python(args, mode):
    started = time.perf_counter()
    stream = cs.read_recorded_stream(args.data, task=args.task)
    cascade = cs.Cascade(args.config, task=args.task, stream_length=len(stream),
                         audit_rate=0.0, on_expert_failure="error")
    cascade.prefit([item["text"] for item in stream])
    if mode == "run (Python function)":
        for _ in cascade.run(stream, expert=lambda item: item["llm"], expert_gets="item"):
            pass
    elif mode == "run (built-in recorded)":
        for _ in cascade.run(stream, expert="recorded", data=args.data):
            pass
    else:
        for item in stream:
            answer = cascade.route(item["text"])
            if isinstance(answer, cs.Deferred):
                cascade.learn(answer, item["llm"])
    return time.perf_counter() - started, cascade.metrics()["deferred"]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default="../shared/data/imdb")
    parser.add_argument("--task", default="imdb")
    parser.add_argument("--config", default="configs/imdb-lr.toml")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    modes = ["run (Python function)", "run (built-in recorded)", "route/learn per item"]
    times = {"cascade bench (CLI)": []} | {m: [] for m in modes}
    calls = {}
    for _ in range(args.rounds):
        seconds, calls["cascade bench (CLI)"] = cli(args)
        times["cascade bench (CLI)"].append(seconds)
        for mode in modes:
            seconds, calls[mode] = python(args, mode)
            times[mode].append(seconds)
    base = statistics.median(times["cascade bench (CLI)"])
    items = len(cs.read_recorded_stream(args.data, task=args.task))
    print(f"{cpu_name()}; {items} items of {args.data}, {args.config}; medians of {args.rounds} rounds")
    print(f"| way | LLM calls | wall s | µs/item | ratio to CLI |")
    print(f"|---|---|---|---|---|")
    for mode, samples in times.items():
        median = statistics.median(samples)
        print(f"| {mode} | {calls[mode]} | {median:.2f} | {1e6 * median / items:.1f} | {median / base:.2f}× |")


if __name__ == "__main__":
    main()
