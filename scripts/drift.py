#!/usr/bin/env python3
"""results/guarantee.md, drift: a teacher that changes mid-stream, and texts
that change, with and without drift recovery.

Teacher switch: from item K on, the gold label plays the LLM instead of
GPT-3.5's recorded answer (`--expert-switch K:label`: the user upgraded the
LLM). IMDB at K = 6,000 (GPT-3.5 and gold differ on 6% of items), HateSpeech
at 2,500 (17%), ISEAR at 1,500 (29%). A teacher that turns against the
students: from item 6,000 of IMDB the LLM answers the opposite of GPT-3.5 (a
prompt edit that swapped the label words); the script writes that field,
`inverted`, into a copy of the stream in a temporary folder. Texts that change:
the IMDB test half in ascending length (`shift_length_order_ids.txt`),
GPT-3.5 throughout.

Each case runs LR -> LLM (configs/D-lr.toml) under an agreement target and,
without a target, at the config's mu with 5% of student answers audited, each
with and without `--no-drift-recovery`, over 5 seeds:

  cascade bench --data D --config configs/D-lr.toml --expert-switch K:label \\
      (--target-agreement A | --audit-rate 0.05) [--no-drift-recovery] --seed S

Reported (means over seeds): agreement with the teacher of the moment over the
W items after K, LLM calls (audits included) in all and in that window, where
the change was found, and the items after K until the target's bound is back
at or above A (0 if it never fell under it).

  scripts/drift.py [--seeds 5]
Needs the release binary (cargo build --release; or one named by CASCADE_BIN).
"""

import argparse
import csv
import json
import os
import statistics
import subprocess
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data"
BIN = Path(os.environ.get("CASCADE_BIN", ROOT / "target" / "release" / "cascade"))

# (name, dataset, extra bench args, K, window W, targets)
CASES = [
    ("IMDB, teacher switch at 6,000", "imdb", ["--expert-switch", "6000:label"], 6000, 2000, [0.90, 0.95]),
    ("HateSpeech, teacher switch at 2,500", "hatespeech", ["--expert-switch", "2500:label"], 2500, 2000, [0.90]),
    ("ISEAR, teacher switch at 1,500", "isear", ["--expert-switch", "1500:label"], 1500, 2000, [0.85]),
    ("IMDB, inverted teacher from 6,000", "imdb-inverted", ["--expert-switch", "6000:inverted"], 6000, 2000,
     [0.90, 0.95]),
    ("IMDB, texts in ascending length", "imdb",
     ["--stream", str(DATA / "imdb" / "shift_length_order_ids.txt")], 6000, 2000, [0.90, 0.95]),
]


def inverted_imdb(tmp):
    """A copy of the IMDB stream with the field `inverted`: the other label
    than GPT-3.5's."""
    folder = Path(tmp) / "imdb-inverted"
    folder.mkdir()
    for name in ("labels.txt", "split_test_ids.txt", "split_train_ids.txt"):
        (folder / name).symlink_to(DATA / "imdb" / name)
    text = subprocess.run(["zstd", "-dc", str(DATA / "imdb" / "stream.jsonl.zst")], check=True,
                          capture_output=True).stdout.decode()
    other = {"neg": "pos", "pos": "neg"}
    with (folder / "stream.jsonl").open("w") as out:
        for line in text.split("\n"):
            if line.strip():
                item = json.loads(line)
                item["inverted"] = other.get(item["gpt35"])
                out.write(json.dumps(item) + "\n")
    return folder


def run(dataset, extra, seed, k, w, target, tmp):
    summary, log = Path(tmp) / "s.json", Path(tmp) / "log.csv"
    data = Path(tmp) / dataset if dataset.endswith("-inverted") else DATA / dataset
    config = dataset.removesuffix("-inverted")
    subprocess.run(
        [str(BIN), "bench", "--data", str(data), "--task", config, "--config", f"configs/{config}-lr.toml",
         "--seed", str(seed), "--summary", str(summary), "--log", str(log), *extra],
        cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    r = json.loads(summary.read_text())
    rows = list(csv.DictReader(log.open()))
    window = rows[k:k + w]
    agree = sum(row["prediction"] == row["llm_label"] for row in window) / len(window)
    llm_in_window = sum(row["answered_by"] == "llm" for row in window)
    found = [n for n in r.get("reopened", []) if n >= k]
    back = None
    if target is not None:
        after = [(n, b) for n, b in r.get("bound_checks", []) if n >= k]
        fell = next((i for i, (_, b) in enumerate(after) if b < target), None)
        if fell is None:
            back = 0
        else:
            up = next((n for n, b in after[fell:] if b >= target), None)
            back = (up - k) if up is not None else float("inf")
    realized = r["agreement_checks"][-1][1] if r.get("agreement_checks") else None
    return {
        "agree": agree,
        "calls": r["llm_calls"] + r.get("audits", 0),
        "window_llm": llm_in_window,
        "found": (found[0] - k) if found else None,
        "false_alarms": len([n for n in r.get("reopened", []) if n < k]),
        "back": back,
        "realized": realized,
    }


def mean(xs):
    xs = [x for x in xs if x is not None]
    return statistics.mean(xs) if xs else None


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--only", help="run only the cases whose name holds this text")
    a = p.parse_args()
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    print(f"CPU: {cpu}; {a.seeds} seeds (42..); LR -> LLM\n")
    print("| case | setting | drift recovery | agreement, W items after K | LLM calls (window) | LLM calls in all "
          "| change found (items after K) | bound back ≥ A (items after K) | final agreement |")
    print("|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        inverted_imdb(tmp)
        for name, dataset, extra, k, w, targets in CASES:
            if a.only and a.only not in name:
                continue
            settings = [(f"target {t}", ["--target-agreement", t], t) for t in targets]
            settings.append(("mu of the config, 5% audits", ["--audit-rate", 0.05], None))
            for label, args, target in settings:
                for recovery in (True, False):
                    flags = [*extra, *map(str, args)] + ([] if recovery else ["--no-drift-recovery"])
                    runs = [run(dataset, flags, 42 + s, k, w, target, tmp) for s in range(a.seeds)]
                    found = [x["found"] for x in runs]
                    found_text = (f"{sum(f is not None for f in found)}/{len(runs)} runs, "
                                  f"median {statistics.median([f for f in found if f is not None]):.0f}"
                                  if any(f is not None for f in found) else "never")
                    fa = sum(x["false_alarms"] for x in runs)
                    if fa:
                        found_text += f"; {fa} before K"
                    backs = [x["back"] for x in runs]
                    back_text = "–" if target is None else (
                        "never fell" if all(b == 0 for b in backs)
                        else f"median {statistics.median(backs):.0f}")
                    print(f"| {name} | {label} | {'on' if recovery else 'off'} | {mean([x['agree'] for x in runs]):.4f} "
                          f"| {mean([x['window_llm'] for x in runs]):.0f} | {mean([x['calls'] for x in runs]):.0f} "
                          f"| {found_text} | {back_text} | {mean([x['realized'] for x in runs]):.4f} |", flush=True)


if __name__ == "__main__":
    main()
