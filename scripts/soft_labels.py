#!/usr/bin/env python3
"""results/guarantee.md, soft labels: hard vs soft labels from the local
expert (Gemma 3 270M), at equal LLM calls, on the first 2,000 IMDB test items.

The expert alone fills its response cache once (about 25 minutes on 2 cores):

  cascade bench --data ../shared/data/imdb --baseline llm-only --expert local \\
      --limit 2000 --expert-cache CACHE

then each cascade run (configs/imdb-embed.toml: LR -> MiniLM embedding head, embeddings cached on disk)
reads the expert's answers and probabilities from the cache
(`--reuse-expert-cache`), with and without `--hard-labels`, at each budget:

  cascade bench --data ../shared/data/imdb --config configs/imdb-embed.toml \\
      --expert local --limit 2000 --expert-cache CACHE --reuse-expert-cache \\
      --llm-budget B [--hard-labels] --seed S

Reported: agreement with the expert on all 2,000 items (from the cache,
after the run), accuracy against gold, LLM calls; means over the seeds.

  scripts/soft_labels.py --cache CACHE [--budgets 400 800] [--seeds 3]
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


def run(cache, budget, hard, seed, tmp):
    out = Path(tmp) / "s.json"
    args = [str(BIN), "bench", "--data", str(DATA / "imdb"), "--config", "configs/imdb-embed.toml",
            "--expert", "local", "--limit", "2000", "--expert-cache", str(cache), "--reuse-expert-cache",
            "--llm-budget", str(budget), "--seed", str(seed), "--summary", str(out)]
    if hard:
        args.append("--hard-labels")
    subprocess.run(args, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    r = json.loads(out.read_text())
    return {"accuracy": 100 * r["accuracy"], "agreement": r["agreement_with_llm"], "calls": r["llm_calls"]}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", required=True, type=Path)
    p.add_argument("--budgets", nargs="+", type=int, default=[400, 800])
    p.add_argument("--seeds", type=int, default=3)
    a = p.parse_args()
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    print(f"CPU: {cpu}; first 2,000 IMDB test items; {a.seeds} seeds (42..)\n")
    print("| LLM budget | labels | LLM calls | agreement with the expert | accuracy vs gold |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for budget in a.budgets:
            for hard in (True, False):
                runs = [run(a.cache.resolve(), budget, hard, 42 + s, tmp) for s in range(a.seeds)]
                m = lambda k: statistics.mean(x[k] for x in runs if x[k] is not None)
                sd = lambda k: statistics.stdev(x[k] for x in runs) if len(runs) > 1 else 0.0
                print(f"| {budget} | {'hard' if hard else 'soft'} | {m('calls'):.0f} | "
                      f"{m('agreement'):.4f} ± {sd('agreement'):.4f} | {m('accuracy'):.2f} ± {sd('accuracy'):.2f} |",
                      flush=True)


if __name__ == "__main__":
    main()
