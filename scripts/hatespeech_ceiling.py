#!/usr/bin/env python3
"""How far the HateSpeech students can go: a ceiling for Table 1's short cells.

A student is trained offline on the recorded LLM labels of the train half
(`cascade bench --baseline distilled`, as many labels as the largest budget),
then answers every test item (`--log` gives its probability). The ceiling
routes, in hindsight, the k items nearest its decision threshold t to the LLM
(the recorded answers), for every t: no warm-up, no gate to learn, and more
labels than a cascade at that budget ever has. A cell that no (t, routing)
point reaches is out of reach of this student, whatever the gates do.

This is a diagnosis: it reads the test stream's gold labels and chooses no
setting (the shipped settings come from `cascade reproduce --select`).

    scripts/hatespeech_ceiling.py                 # the MPNet head of configs/selected/hatespeech.toml
    scripts/hatespeech_ceiling.py --level minilm --config configs/selected/hatespeech-3level.toml
"""

import argparse
import csv
import subprocess
import sys
import tempfile
from pathlib import Path

# The paper's Table 1, HateSpeech: budget -> (accuracy, recall of hate).
PAPER = {600: (82.66, 82.36), 2700: (85.35, 77.20), 4900: (83.26, 81.03)}


def distilled_log(binary, data, config, level, labels, out):
    subprocess.run(
        [binary, "bench", "--data", data, "--config", config,
         "--baseline", "distilled", "--level", level,
         "--llm-budget", str(labels), "--log", str(out)],
        check=True, stdout=subprocess.DEVNULL,
    )
    return read_log(out)


def read_log(path):
    rows = list(csv.DictReader(path.open()))
    for row in rows:
        p = float(row["probability"])
        row["p_hate"] = p if row["prediction"] == "hate" else 1.0 - p
    return rows


def precision(rows, field):
    said = [row for row in rows if row[field] == "hate"]
    return 100.0 * sum(row["gold"] == "hate" for row in said) / max(len(said), 1)


def routed(rows, calls, threshold):
    """Accuracy and recall of hate (%) when the `calls` items nearest the
    threshold go to the LLM and the student answers the rest."""
    nearest = sorted(range(len(rows)), key=lambda i: abs(rows[i]["p_hate"] - threshold))
    to_llm = set(nearest[:calls])
    correct = true_hate = gold_hate = 0
    for i, row in enumerate(rows):
        if i in to_llm:
            answer = row["llm_label"]
        else:
            answer = "hate" if row["p_hate"] > threshold else "noHate"
        correct += answer == row["gold"]
        gold_hate += row["gold"] == "hate"
        true_hate += answer == "hate" and row["gold"] == "hate"
    return 100.0 * correct / len(rows), 100.0 * true_hate / gold_hate


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--binary", default="target/release/cascade")
    ap.add_argument("--data", default="../shared/data/hatespeech")
    ap.add_argument("--config", default="configs/selected/hatespeech.toml")
    ap.add_argument("--level", default="embed")
    ap.add_argument("--labels", type=int, default=4899,
                    help="train-half LLM labels the student learns from (default: the largest budget's)")
    ap.add_argument("--log", type=Path,
                    help="keep the student's per-item log here (default: a temporary file)")
    ap.add_argument("--reuse-log", action="store_true",
                    help="read --log as an earlier run of this script wrote it instead of training again")
    args = ap.parse_args()

    if args.reuse_log:
        if args.log is None:
            ap.error("--reuse-log needs --log")
        rows = read_log(args.log)
    elif args.log is not None:
        rows = distilled_log(args.binary, args.data, args.config, args.level, args.labels, args.log)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            rows = distilled_log(args.binary, args.data, args.config, args.level,
                                 args.labels, Path(tmp) / "log.csv")
    thresholds = [t / 100 for t in range(5, 100, 5)]
    print(f"student `{args.level}` of {args.config}, distilled on {args.labels} train-half LLM labels; "
          f"{len(rows)} test items")
    gold_hate = sum(row["gold"] == "hate" for row in rows)
    print(f"precision of hate: the LLM {precision(rows, 'llm_label'):.2f}%, "
          f"the student alone {precision(rows, 'prediction'):.2f}%")
    reachable = True
    for calls, (paper_acc, paper_recall) in PAPER.items():
        points = [(t, *routed(rows, calls, t)) for t in thresholds]
        # Accuracy ≥ the paper's with the paper's recall allows this many
        # false alarms, hence needs at least this precision.
        true_hate = paper_recall / 100 * gold_hate
        false_alarms = (1 - paper_acc / 100) * len(rows) - (gold_hate - true_hate)
        print(f"\n{calls} LLM calls (paper: accuracy {paper_acc}, recall {paper_recall}; "
              f"both need precision ≥ {100 * true_hate / (true_hate + false_alarms):.2f}%)")
        print("| threshold | accuracy | recall of hate | both ≥ paper |")
        print("|---|---|---|---|")
        for t, acc, recall in points:
            both = acc >= paper_acc and recall >= paper_recall
            print(f"| {t:.2f} | {acc:.2f} | {recall:.2f} | {'yes' if both else ''} |")
        best = max(points, key=lambda p: min(p[1] - paper_acc, p[2] - paper_recall))
        met = min(best[1] - paper_acc, best[2] - paper_recall) >= 0
        reachable &= met
        print(f"best worse-of (accuracy − paper, recall − paper): {min(best[1] - paper_acc, best[2] - paper_recall):+.2f} "
              f"at threshold {best[0]:.2f} ({'reachable' if met else 'out of reach'})")
    return 0 if reachable else 1


if __name__ == "__main__":
    sys.exit(main())
