#!/usr/bin/env python3
"""Runs `cascade bench` over a grid of mu values and prints a markdown table.

usage: scripts/sweep.py --data DIR --config FILE --mu 1e-4,2e-4 [--set KEY=VALUE ...] [--json OUT]

--set SECTION.KEY=VALUE rewrites the first `KEY = value` line after the
`[levels.SECTION]` header (a bare KEY: the first line anywhere), e.g.
--set logreg.optimizer='"adam"' --set logreg.lr=0.1, so variants need no extra files.
"""
import argparse, json, os, re, subprocess, sys, tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release", "cascade")

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--config", required=True)
    ap.add_argument("--mu", required=True, help="comma-separated mu values")
    ap.add_argument("--set", action="append", default=[], help="KEY=VALUE config override")
    ap.add_argument("--json", help="write all summaries here")
    ap.add_argument("extra", nargs="*", help="extra bench flags after --")
    a = ap.parse_args()
    text = open(a.config).read()
    for kv in a.set:
        key, value = kv.split("=", 1)
        section, _, key = key.rpartition(".")
        start = text.index(f"[levels.{section}]") if section else 0
        head, tail = text[:start], text[start:]
        tail, n = re.subn(rf"(?m)^{re.escape(key)}\s*=.*$", f"{key} = {value}", tail, count=1)
        text = head + tail
        if n == 0:
            sys.exit(f"--set {key}: no such line in {a.config}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cfg = os.path.join(tmp, "config.toml")
        open(cfg, "w").write(text)
        for mu in a.mu.split(","):
            out = os.path.join(tmp, f"summary-{mu}.json")
            subprocess.run([BIN, "bench", "--data", a.data, "--config", cfg, "--mu", mu,
                            "--summary", out, *a.extra], check=True, stdout=subprocess.DEVNULL)
            s = json.load(open(out))
            rows.append(s)
    binary = any("recall" in s for s in rows)
    head = "| mu | LLM calls | LLM % | accuracy |" + (" recall | f1 |" if binary else "") + " wall s |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for s in rows:
        line = f"| {s['mu']:g} | {s['llm_calls']} | {100*s['llm_fraction']:.1f} | {s['accuracy']:.4f} |"
        if binary:
            line += f" {s.get('recall', 0):.4f} | {s.get('f1', 0):.4f} |"
        print(line + f" {s['wall_seconds']:.2f} |")
    if a.json:
        json.dump(rows, open(a.json, "w"), indent=1)

if __name__ == "__main__":
    main()
