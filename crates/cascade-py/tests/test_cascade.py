"""cascade_stream from Python: the same decisions as the CLI, experts that
misbehave, state that round-trips, errors that name the field."""

import asyncio
import csv
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time

import pytest

import cascade_stream as cs

ISEAR_LR = "configs/isear-lr.toml"


def bench_like(stream, **kwargs):
    """A cascade set up as `cascade bench` sets up its replay."""
    cascade = cs.Cascade(
        ISEAR_LR,
        task="isear",
        stream_length=len(stream),
        audit_rate=0.0,
        on_expert_failure="error",
        **kwargs,
    )
    cascade.prefit([item["text"] for item in stream])
    return cascade


def recorded(item):
    return item["llm"]


def decisions(records):
    return [(r["answered_by"] or "", r["label"] or "") for r in records]


def test_run_and_route_make_the_decisions_of_cascade_bench(isear, cascade_bin, tmp_path):
    log = tmp_path / "bench.csv"
    subprocess.run(
        [cascade_bin, "bench", "--data", "../shared/data/isear", "--config", ISEAR_LR,
         "--log", log],
        check=True,
        capture_output=True,
    )
    with open(log, newline="") as f:
        want = [(row["answered_by"], row["prediction"]) for row in csv.DictReader(f)]
    assert len(want) == len(isear) == 3833

    cascade = bench_like(isear)
    got = decisions(cascade.run(isear, expert=recorded, expert_gets="item"))
    assert got == want
    metrics = cascade.metrics()
    assert metrics["deferred"] == sum(1 for by, _ in want if by == "llm") == 3086

    # Item by item, River's style: the same decisions again.
    cascade = bench_like(isear)
    by_hand = []
    for item in isear:
        answer = cascade.predict_one(item["text"])
        if isinstance(answer, cs.Deferred):
            answer = cascade.learn_one(answer, item["llm"])
        by_hand.append((answer.answered_by or "", answer.label or ""))
    assert by_hand == want


def test_an_expert_that_raises_or_returns_garbage_is_a_failure_not_a_crash(isear):
    stream = isear[:300]

    def flaky(text):
        n = len(text) % 4
        if n == 0:
            raise ConnectionError("the LLM is down")
        if n == 1:
            return object()  # garbage
        if n == 2:
            return "not-a-label"
        return "joy"

    cascade = cs.Cascade(ISEAR_LR, task="isear")
    records = list(cascade.run(stream, expert=flaky))
    assert len(records) == len(stream)
    statuses = {r["status"] for r in records}
    assert statuses <= {"ok", "expert_unavailable"}
    errors = [r["error"] for r in records if r["status"] == "expert_unavailable"]
    assert any("ConnectionError: the LLM is down" in e for e in errors)
    assert any("got a object" in e for e in errors)
    assert any("not-a-label" in e for e in errors)
    # Every failure was answered by the student standing in.
    assert all(r["answered_by"] == "lr" for r in records if r["status"] != "ok")

    # Under the paper's accounting the same items are errors instead.
    cascade = cs.Cascade(ISEAR_LR, task="isear", on_expert_failure="error")
    records = list(cascade.run(stream, expert=flaky))
    assert {r["status"] for r in records} <= {"ok", "error"}
    assert cascade.metrics()["errors"] == sum(r["status"] == "error" for r in records) > 0


def test_slow_and_async_experts_give_the_same_decisions(isear):
    stream = isear[:200]

    def fast(item):
        return item["llm"]

    def slow(item):
        time.sleep(0.002)
        return item["llm"]

    async def asynchronous(item):
        await asyncio.sleep(0.001)
        return {item["llm"]: 0.9} if item["llm"] else None

    def run(expert, n):
        cascade = bench_like(stream)
        return decisions(cascade.run(stream, expert=expert, expert_gets="item", max_in_flight=n))

    want = run(fast, 1)
    assert run(slow, 1) == want
    assert run(asynchronous, 1) == want
    # With calls in flight, labels are learned later: other decisions, but
    # the same whichever call returns first.
    assert run(slow, 4) == run(fast, 4)


def test_state_round_trips_through_pickle_and_continues_exactly(isear):
    first, rest = isear[:1500], isear[1500:2500]
    whole = bench_like(isear[:2500])
    want = decisions(whole.run(first + rest, expert=recorded, expert_gets="item"))

    cascade = bench_like(isear[:2500])
    got = decisions(cascade.run(first, expert=recorded, expert_gets="item"))
    restored = pickle.loads(pickle.dumps(cascade))
    got += decisions(restored.run(rest, expert=recorded, expert_gets="item"))
    assert got == want
    assert restored.metrics() == whole.metrics()

    # The bytes are the CLI's sealed checkpoint: an edit is refused, and so
    # is a state from another config.
    state = bytearray(cascade.save_state())
    state[-3] ^= 1
    with pytest.raises(ValueError, match="checksum"):
        cascade.load_state(bytes(state))
    other = cs.Cascade(ISEAR_LR, task="isear", mu=0.01)
    with pytest.raises(ValueError, match="another config"):
        other.load_state(cascade.save_state())


def test_a_bad_config_field_is_named():
    config = isear_lr_dict()
    config["levels"][0]["cache_size"] = 10**12
    with pytest.raises(cs.ConfigError, match="cache_size"):
        cs.Cascade(config, labels=["a", "b"])
    config["levels"][0]["cache_size"] = 8
    config["levels"][0]["cahce"] = 8
    with pytest.raises(cs.ConfigError, match="cahce"):
        cs.Cascade(config, labels=["a", "b"])
    with pytest.raises(cs.ConfigError, match="on_expert_failure"):
        cs.Cascade(ISEAR_LR, task="isear", on_expert_failure="maybe")
    with pytest.raises(cs.ConfigError, match="task"):
        cs.Cascade(ISEAR_LR, task="no-such-task")
    with pytest.raises(cs.ConfigError, match="exactly one"):
        cs.Cascade(ISEAR_LR)
    cascade = cs.Cascade(ISEAR_LR, task="isear")
    with pytest.raises(cs.ConfigError, match="built-in experts"):
        cascade.run([], expert="gpt-7")
    with pytest.raises(cs.ConfigError, match="needs data"):
        cascade.run([], expert="recorded")
    with pytest.raises(cs.ConfigError, match="max_in_flight"):
        cascade.run([], expert=recorded, max_in_flight=0)
    # A refused run leaves the cascade usable.
    assert cascade.metrics()["items"] == 0


def isear_lr_dict():
    """configs/isear-lr.toml as a dict."""
    return {
        "mu": 1.4e-3,
        "seed": 42,
        "warmup_updates": 10,
        "levels": [
            {
                "name": "lr",
                "kind": "logreg",
                "cost": 1182,
                "cache_size": 8,
                "epochs": 1,
                "gate": {"lr": 7e-4, "regularization": 1e-4, "decaying_factor": 0.8,
                         "calibration": 0.15},
                "logreg": {"buckets": 1048576, "ngrams": 2, "optimizer": "adagrad", "lr": 0.5,
                           "l2": 1e-6, "idf": "streaming"},
            }
        ],
    }


def test_a_dict_config_and_labels_work_like_a_file(isear):
    config = isear_lr_dict()
    stream = isear[:500]
    from_file = cs.Cascade(ISEAR_LR, task="isear")
    from_dict = cs.Cascade(config, labels=from_file.labels)
    assert decisions(from_dict.run(stream, expert=recorded, expert_gets="item")) == decisions(
        from_file.run(stream, expert=recorded, expert_gets="item")
    )


def test_the_built_in_recorded_expert_and_bad_items(isear):
    cascade = cs.Cascade(ISEAR_LR, task="isear")
    items = [{"id": item["id"], "text": item["text"]} for item in isear[:50]]
    items += [{"id": "x"}, {"text": "   "}, 42, "a plain text with no id"]
    records = list(cascade.run(items, expert="recorded", data="../shared/data/isear"))
    assert [r["id"] for r in records[:50]] == [item["id"] for item in isear[:50]]
    assert [r["status"] for r in records[50:53]] == ["bad_input"] * 3
    assert records[50]["id"] == "x"
    # A text without an id is not in the recorded answers: the student stands in.
    assert records[53]["status"] in ("ok", "expert_unavailable")


def test_one_run_at_a_time_and_the_session_comes_back(isear):
    cascade = cs.Cascade(ISEAR_LR, task="isear")
    run = cascade.run(isear[:20], expert=recorded, expert_gets="item")
    next(run)
    with pytest.raises(RuntimeError, match="in progress"):
        cascade.route("hello")
    with pytest.raises(RuntimeError, match="in progress"):
        cascade.run([], expert=recorded)
    run.close()
    assert cascade.metrics()["items"] >= 1
    with cascade.run(isear[:5], expert=recorded, expert_gets="item") as run:
        assert len(list(run)) == 5
    deferred = cs.Cascade(ISEAR_LR, task="isear").route("an early item goes to the LLM")
    assert isinstance(deferred, cs.Deferred)
    with pytest.raises(ValueError, match="another cascade"):
        cascade.learn(deferred, "joy")


@pytest.mark.parametrize("in_flight", [1, 4])
def test_ctrl_c_interrupts_a_run(in_flight):
    script = textwrap.dedent(
        """
        import signal, sys, time
        import cascade_stream as cs
        # A launcher in the background (nohup, `cmd &`) may hand SIGINT down
        # ignored; a terminal's Ctrl-C reaches Python's default handler.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        def slow(text):
            time.sleep(0.05)
            return "joy"
        cascade = cs.Cascade("configs/isear-lr.toml", task="isear")
        print("started", flush=True)
        texts = ("text %d" % i for i in range(100000))
        for record in cascade.run(texts, expert=slow, max_in_flight=int(sys.argv[1])):
            pass
        print("finished", flush=True)
        """
    )
    child = subprocess.Popen(
        [sys.executable, "-c", script, str(in_flight)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert child.stdout.readline().strip() == "started"
    time.sleep(0.5)
    child.send_signal(signal.SIGINT)
    try:
        _, stderr = child.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        child.kill()
        pytest.fail("the run ignored Ctrl-C")
    assert child.returncode != 0
    assert "KeyboardInterrupt" in stderr


def test_the_built_in_openai_expert_against_a_local_server():
    """`expert="openai"`: the runtime's chat-completions client, here against a
    tiny OpenAI-compatible server on 127.0.0.1 that answers "fear"."""
    import http.server
    import json
    import threading

    requests = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            requests.append(body)
            reply = json.dumps(
                {"choices": [{"index": 0, "message": {"role": "assistant", "content": "fear"},
                              "finish_reason": "stop"}],
                 "usage": {"prompt_tokens": 10, "completion_tokens": 1}}
            ).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        cascade = cs.Cascade(ISEAR_LR, task="tasks/isear.toml")
        texts = [f"a text number {i} about something" for i in range(30)]
        records = list(cascade.run(
            texts, expert="openai",
            base_url=f"http://127.0.0.1:{server.server_address[1]}/v1", model="m",
        ))
    finally:
        server.shutdown()
    llm = [r for r in records if r["answered_by"] == "llm"]
    assert llm and all(r["label"] == "fear" and r["status"] == "ok" for r in llm)
    assert len(requests) == cascade.metrics()["llm_calls"] >= len(llm)
    assert requests[0]["model"] == "m"
    assert any("a text number 0" in m["content"] for m in requests[0]["messages"])
