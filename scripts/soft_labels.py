#!/usr/bin/env python3
"""results/guarantee.md, soft labels: hard vs soft labels from the local
expert (Gemma 3 270M), at equal LLM calls, on the first 2,000 IMDB test items.

The expert alone fills its response cache once (about 25 minutes on 2 cores):

  cascade bench --data ../shared/data/imdb --baseline llm-only --expert local \\
      --limit 2000 --expert-cache CACHE

then each cascade run (configs/imdb-embed.toml: LR -> MiniLM embedding head,
embeddings cached on disk) reads the expert's answers and probabilities from
the cache (`--reuse-expert-cache`), at each budget and soft-label weight w
(what is learned: (1 - w) one-hot(label) + w probabilities; w = 0 is hard
labels):

  cascade bench --data ../shared/data/imdb --config configs/imdb-embed.toml \\
      --expert local --limit 2000 --expert-cache CACHE --reuse-expert-cache \\
      --llm-budget B --soft-label-weight W --seed S

Reported: agreement with the expert on all 2,000 items (from the cache,
after the run), accuracy against gold, LLM calls; means over the seeds.

  scripts/soft_labels.py --select --cache TRAIN_CACHE   # w, on the first 2,000 train-half items
  scripts/soft_labels.py --cache CACHE                  # hard, the chosen w and w = 1 on the test items
Needs the release binary and scripts/setup.sh's models.
"""

import argparse
import json
import statistics
import subprocess
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data"
BIN = ROOT / "target" / "release" / "cascade"


def run(cache, budget, weight, seed, tmp, stream):
    out = Path(tmp) / "s.json"
    args = [str(BIN), "bench", "--data", str(DATA / "imdb"), "--config", "configs/imdb-embed.toml",
            "--stream", stream, "--expert", "local", "--limit", "2000", "--expert-cache", str(cache),
            "--reuse-expert-cache", "--llm-budget", str(budget), "--soft-label-weight", str(weight),
            "--seed", str(seed), "--summary", str(out)]
    subprocess.run(args, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    r = json.loads(out.read_text())
    return {"accuracy": 100 * r["accuracy"], "agreement": r["agreement_with_llm"], "calls": r["llm_calls"]}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", required=True, type=Path)
    p.add_argument("--budgets", nargs="+", type=int, default=[400, 800])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--select", action="store_true", help="choose w on the train half")
    p.add_argument("--weights", nargs="+", type=float, help="default: 0 0.25 0.5 0.75 1 (--select), else 0 0.5 1")
    a = p.parse_args()
    stream = str(DATA / "imdb" / "split_train_ids.txt") if a.select else "test"
    weights = a.weights or ([0, 0.25, 0.5, 0.75, 1] if a.select else [0, 0.5, 1])
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    half = "train-half" if a.select else "test"
    print(f"CPU: {cpu}; first 2,000 IMDB {half} items; {a.seeds} seeds (42..)\n")
    print("| LLM budget | soft-label weight w | LLM calls | agreement with the expert | accuracy vs gold |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for budget in a.budgets:
            for weight in weights:
                runs = [run(a.cache.resolve(), budget, weight, 42 + s, tmp, stream) for s in range(a.seeds)]
                m = lambda k: statistics.mean(x[k] for x in runs if x[k] is not None)
                sd = lambda k: statistics.stdev(x[k] for x in runs) if len(runs) > 1 else 0.0
                print(f"| {budget} | {weight:g}{' (hard)' if weight == 0 else ''} | {m('calls'):.0f} | "
                      f"{m('agreement'):.4f} ± {sd('agreement'):.4f} | {m('accuracy'):.2f} ± {sd('accuracy'):.2f} |",
                      flush=True)


if __name__ == "__main__":
    main()
