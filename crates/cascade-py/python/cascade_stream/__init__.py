"""Online cascade learning over a stream (Nie et al., ICML 2024), on the Rust runtime.

Cheap students (an online logistic regression, transformer students) answer
what they can; the rest goes to your LLM, whose every answer trains them::

    import cascade_stream as cs

    cascade = cs.Cascade("configs/isear-lr.toml", task="isear")
    for record in cascade.run(texts, expert=my_llm):   # my_llm(text) -> label
        print(record["label"], record["answered_by"])
    print(cascade.metrics())

Or item by item, in River's style::

    answer = cascade.predict_one(text)
    if isinstance(answer, cs.Deferred):
        answer = cascade.learn_one(answer, my_llm(answer.text))
"""

from ._native import (
    Answer,
    Cascade,
    CascadeError,
    ConfigError,
    Deferred,
    Run,
    __version__,
    read_recorded_stream,
)

__all__ = [
    "Answer",
    "Cascade",
    "CascadeError",
    "ConfigError",
    "Deferred",
    "Run",
    "__version__",
    "read_recorded_stream",
]
