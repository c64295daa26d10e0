#!/usr/bin/env python3
"""Measurements of results/cluster.md: cascade workers on a NATS JetStream
server this script starts (models/nats-server, from scripts/setup.sh nats) on
a free loopback port with a temporary store.

  scripts/cluster_bench.py scale    [--workers 1 2 4 8] [--delay-ms 50]
  scripts/cluster_bench.py quality  [--config configs/imdb-lr.toml] [--budget 3800]
  scripts/cluster_bench.py kill     [--workers 3] [--kills 2]
  scripts/cluster_bench.py restart  [--workers 3]   (the server, mid-stream, store kept)

Every section replays the IMDB test stream (12,500 items, the authors' order)
with the recorded GPT-3.5 answers as the expert and prints a markdown table.
Needs the release binary (cargo build --release) and the `zstd` command.
"""

import argparse
import collections
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "imdb"
BIN = ROOT / "target" / "release" / "cascade"
SERVER = ROOT / "models" / "nats-server" / "nats-server"


def imdb_test(path):
    """The IMDB test stream as JSONL; gold and recorded LLM label by id."""
    lines = subprocess.run(
        ["zstd", "-dc", str(DATA / "stream.jsonl.zst")], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    items = {}
    for line in lines:
        d = json.loads(line)
        items[d["id"]] = d
    ids = [int(x) for x in (DATA / "split_test_ids.txt").read_text().split()]
    with open(path, "w") as f:
        for i in ids:
            f.write(json.dumps({"id": i, "text": items[i]["text"]}) + "\n")
    return {i: (items[i]["label"], items[i]["gpt35"]) for i in ids}


class Server:
    def __init__(self):
        self.store = tempfile.TemporaryDirectory()
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.start()

    def restart(self, down_for):
        self.proc.kill()
        self.proc.wait()
        time.sleep(down_for)
        self.start()

    def start(self):
        self.proc = subprocess.Popen(
            [str(SERVER), "-js", "-a", "127.0.0.1", "-p", str(self.port), "-sd", self.store.name],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.time() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                break
            except OSError:
                if time.time() > deadline:
                    sys.exit("nats-server did not start")
                time.sleep(0.05)
        self.url = f"nats://127.0.0.1:{self.port}"

    def close(self):
        self.proc.kill()
        self.proc.wait()
        self.store.cleanup()


def cascade(*args, **kw):
    return subprocess.run([str(BIN), *map(str, args)], cwd=ROOT, check=True, **kw)


def worker(server, name, config, extra, log):
    args = [
        "worker", "--nats", server.url, "--task", "imdb", "--config", config,
        "--recorded-data", DATA, "--name", name, *extra,
    ]
    return subprocess.Popen([str(BIN), *map(str, args)], cwd=ROOT, stderr=log, stdout=subprocess.DEVNULL)


def stop(procs):
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        p.wait(timeout=120)


def score(path, truth):
    recs = [json.loads(line) for line in open(path)]
    per_id = collections.Counter(r["id"] for r in recs)
    last = {r["id"]: r for r in recs}
    n = len(truth)
    return {
        "records": len(recs),
        "ids": len(per_id),
        "doubled": sum(c - 1 for c in per_id.values()),
        "missing": n - len(set(per_id) & set(truth)),
        "accuracy": 100 * sum(last[i]["label"] == truth[i][0] for i in last) / n,
        "agreement": 100 * sum(last[i]["label"] == truth[i][1] for i in last) / n,
        "llm": sum(r["answered_by"] == "llm" for r in last.values()),
        "workers": dict(collections.Counter(r.get("worker") for r in last.values())),
    }


def cluster_run(tmp, stream, truth, n_workers, config, extra, kills=0, ack_wait=5, restart=False):
    """Publishes the stream, runs the workers until every result is stored; returns (score, seconds, learner digests)."""
    server = Server()
    try:
        cascade("publish", "--nats", server.url, "--input", stream, stderr=subprocess.DEVNULL)
        logs = {f"w{i}": open(tmp / f"w{i}.log", "w") for i in range(1, n_workers + 1)}
        common = [*extra, "--ack-wait-secs", ack_wait, "--snapshot-every", 500]
        state = lambda name: tmp / f"{name}.learner"
        start = time.time()
        procs = {
            name: worker(server, name, config, [*common, "--save-learner", state(name)], log)
            for name, log in logs.items()
        }
        out = tmp / "results.jsonl"
        collect = [str(BIN), *map(str, ["collect", "--nats", server.url, "--expect", len(truth), "--output", out, "--idle-secs", 120])]
        collector = subprocess.Popen(collect, cwd=ROOT, stderr=subprocess.DEVNULL)
        victim = "w2" if n_workers > 1 else "w1"
        for _ in range(kills):
            time.sleep(random.uniform(1.0, 3.0))
            procs[victim].kill()
            procs[victim].wait()
            time.sleep(0.5)
            procs[victim] = worker(server, victim, config, [*common, "--save-learner", state(victim)], logs[victim])
        if restart:
            time.sleep(random.uniform(2.0, 4.0))
            server.restart(1.0)
            print(f"server restarted", flush=True)
        while collector.wait() != 0:  # it lost the server: read again, from the first result
            collector = subprocess.Popen(collect, cwd=ROOT, stderr=subprocess.DEVNULL)
        seconds = time.time() - start
        stop(procs.values())
        digests = {name: hash(state(name).read_bytes()) for name in procs}
        return score(out, truth), seconds, digests
    finally:
        server.close()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("section", choices=["scale", "quality", "kill", "restart"])
    p.add_argument("--workers", type=int, nargs="+")
    p.add_argument("--delay-ms", type=int, default=20)
    p.add_argument("--config", default="configs/imdb-lr.toml")
    p.add_argument("--budget", type=int, default=3800)
    p.add_argument("--kills", type=int, default=2)
    p.add_argument("--max-in-flight", type=int, default=8)
    p.add_argument("--seed", type=int, default=1)
    a = p.parse_args()
    random.seed(a.seed)
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    print(f"CPU: {cpu}, {os.cpu_count()} cores")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        stream = tmp / "imdb_test.jsonl"
        truth = imdb_test(stream)
        flight = ["--max-in-flight", a.max_in_flight, "--recorded-delay-ms", a.delay_ms]
        if a.section == "scale":
            print(f"\n| workers | items/s | seconds | LLM calls | accuracy | per worker |")
            print("|---|---|---|---|---|---|")
            for n in a.workers or [1, 2, 4, 8]:
                s, sec, _ = cluster_run(tmp, stream, truth, n, a.config, flight)
                assert s["ids"] == len(truth) and s["doubled"] == 0, s
                print(f"| {n} | {len(truth) / sec:.0f} | {sec:.1f} | {s['llm']} | {s['accuracy']:.2f} | {sorted(s['workers'].values())} |", flush=True)
        elif a.section == "quality":
            budget = ["--llm-budget", a.budget]
            out = tmp / "single.jsonl"
            start = time.time()
            cascade("run", "--task", "imdb", "--config", a.config, "--recorded-data", DATA, *flight, *budget,
                    "--input", stream, "--output", out, stderr=subprocess.DEVNULL)
            single, single_sec = score(out, truth), time.time() - start
            n = a.workers[0] if a.workers else 3
            s, sec, digests = cluster_run(tmp, stream, truth, n, a.config, [*flight, *budget, "--stream-length", len(truth)])
            print(f"\nconfig {a.config}, budget {a.budget} calls, recorded expert {a.delay_ms} ms/call, {a.max_in_flight} calls in flight per process\n")
            print("| | accuracy (gold) | agreement with GPT-3.5 | LLM calls | seconds | results per id |")
            print("|---|---|---|---|---|---|")
            print(f"| `cascade run` | {single['accuracy']:.2f} | {single['agreement']:.2f} | {single['llm']} | {single_sec:.1f} | {single['records'] / single['ids']:.0f} |")
            print(f"| {n} workers | {s['accuracy']:.2f} | {s['agreement']:.2f} | {s['llm']} | {sec:.1f} | {s['records'] / s['ids']:.0f} |")
            print(f"\nlearners identical after the stream: {len(set(digests.values())) == 1}")
        else:
            n = a.workers[0] if a.workers else 3
            restart = a.section == "restart"
            kills = 0 if restart else a.kills
            s, sec, digests = cluster_run(tmp, stream, truth, n, a.config, flight, kills=kills, restart=restart)
            what = "the server killed at a random point and restarted on its store" if restart else f"w2 SIGKILLed {kills} times at random points and restarted"
            print(f"\n{n} workers, {what}; {sec:.1f} s")
            print(f"records {s['records']}, distinct ids {s['ids']}, doubled {s['doubled']}, missing {s['missing']}")
            print(f"accuracy {s['accuracy']:.2f}, LLM answers {s['llm']}, per worker {s['workers']}")
            print(f"learners identical after the stream: {len(set(digests.values())) == 1}")
            for name in sorted(digests):
                lines = (tmp / f"{name}.log").read_text().strip().splitlines()
                notes = [l for l in lines[:-1] if "caught up" in l or "log" in l.lower() or "handed back" in l][:8]
                print(f"  {name}: {lines[-1]}")
                for note in notes:
                    print(f"      {note}")


if __name__ == "__main__":
    main()
