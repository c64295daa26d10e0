#!/usr/bin/env python3
"""Table 1's cascade cells with the int8 frozen encoder, beside the f32 ones.

For each dataset, its train-half-selected config (`configs/selected/D.toml`)
with `quantize = "int8"` added to every embedding-head level, at the paper's
three budgets and the seeds Table 1 uses (the config's and the next 4):

  cascade bench --data D --config <int8 copy> --llm-budget B --seed S

The f32 cells are read from results/table1.json (same configs, budgets and
seeds). Prints accuracy mean ± sd per cell and the difference; the issue's
bar is |int8 - f32| <= 0.3 pt. The first run of a dataset encodes its test
stream with the int8 encoder into `.cache/embeddings` (its own file).

  scripts/int8_cells.py [--datasets imdb hatespeech isear] [--seeds 5]

Needs the release binary (cargo build --release; or one named by CASCADE_BIN).
"""

import argparse
import json
import os
import statistics
import subprocess
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data"
BUDGETS = {"imdb": [1300, 3800, 5200], "hatespeech": [600, 2700, 4900], "isear": [1200, 1500, 2700]}


def int8_config(dataset, work):
    """The selected config with `quantize = "int8"` in each embedding-head table."""
    lines = []
    for line in (ROOT / "configs" / "selected" / f"{dataset}.toml").read_text().splitlines():
        lines.append(line)
        if line.strip() == "[levels.embedding_head]":
            lines.append('quantize = "int8"')
    path = work / f"{dataset}-int8.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def config_seed(dataset):
    for line in (ROOT / "configs" / "selected" / f"{dataset}.toml").read_text().splitlines():
        if line.startswith("seed"):
            return int(line.split("=")[1])
    return 42


def f32_cells(dataset):
    table = json.loads((ROOT / "results" / "table1.json").read_text())
    cells = {}
    for run in table["runs"]:
        if run["dataset"] == dataset and run["kind"] == "cascade":
            cells.setdefault(run["budget"], []).append(100 * run["report"]["accuracy"])
    return cells


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="+", default=["hatespeech", "isear", "imdb"])
    parser.add_argument("--seeds", type=int, default=5)
    args = parser.parse_args()
    binary = os.environ.get("CASCADE_BIN", str(ROOT / "target" / "release" / "cascade"))
    work = Path(tempfile.mkdtemp(prefix="int8-cells-"))
    print("| dataset | budget | f32 (table1.json) | int8 | int8 − f32 | forced (most) |")
    print("|---|---|---|---|---|---|")
    for dataset in args.datasets:
        config = int8_config(dataset, work)
        first = config_seed(dataset)
        f32 = f32_cells(dataset)
        for budget in BUDGETS[dataset]:
            accuracies, forced = [], 0
            for seed in range(first, first + args.seeds):
                summary = work / f"{dataset}-{budget}-{seed}.json"
                subprocess.run(
                    [binary, "bench", "--data", str(DATA / dataset), "--config", str(config),
                     "--llm-budget", str(budget), "--seed", str(seed), "--summary", str(summary)],
                    cwd=ROOT, check=True, stdout=subprocess.DEVNULL,
                )
                report = json.loads(summary.read_text())
                accuracies.append(100 * report["accuracy"])
                forced = max(forced, (report["forced_answers"] or 0) + (report["forced_deferrals"] or 0))
            mean = statistics.mean(accuracies)
            sd = statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0
            base = f32.get(budget, [])
            base_mean = statistics.mean(base) if base else float("nan")
            base_sd = statistics.stdev(base) if len(base) > 1 else 0.0
            print(
                f"| {dataset} | {budget} | {base_mean:.2f} ± {base_sd:.2f} | {mean:.2f} ± {sd:.2f} | "
                f"{mean - base_mean:+.2f} | {forced} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
