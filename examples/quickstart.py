"""The ISEAR test stream through LR -> LLM, driven from Python.

A Python function plays the LLM: it returns the GPT-3.5 answer the authors
recorded for each item. The decisions and LLM calls are exactly those of

    cascade bench --data ../shared/data/isear --config configs/isear-lr.toml

Run from the repository root after `pip install ./crates/cascade-py`:

    python examples/quickstart.py
"""

import time

import cascade_stream as cs

DATA = "../shared/data/isear"

# [{"id", "text", "gold", "llm"}], in the authors' order.
stream = cs.read_recorded_stream(DATA, task="isear")

# `cascade bench` replays the paper's accounting: an LLM answer without a
# label is an error, not a student's fallback, and nothing is audited.
cascade = cs.Cascade(
    "configs/isear-lr.toml",
    task="isear",
    stream_length=len(stream),
    audit_rate=0.0,
    on_expert_failure="error",
)
cascade.prefit([item["text"] for item in stream])  # as bench does


def recorded_llm(item):
    """Your LLM call goes here; this one returns the recorded answer."""
    return item["llm"]  # a label name, or None when GPT-3.5 gave no label


started = time.perf_counter()
correct = 0
for item, record in zip(stream, cascade.run(stream, expert=recorded_llm, expert_gets="item")):
    correct += record["label"] == item["gold"]
elapsed = time.perf_counter() - started

metrics = cascade.metrics()
calls = metrics["deferred"]
print(
    f"{DATA}: {len(stream)} items, {calls} LLM calls ({100 * calls / len(stream):.2f}%), "
    f"accuracy {correct / len(stream):.5f}"
)
print(f"answered by the students: {metrics['answered']}; {elapsed:.2f} s")
