"""Type stubs of cascade_stream (the Rust extension `cascade_stream._native`)."""

import os
from typing import Any, Awaitable, Callable, Iterable, Iterator, Literal, Mapping, Optional, Union

__version__: str

#: What an LLM answers: a label name, a label index, probabilities per label
#: name (the top one is learned), or None for no label.
ExpertAnswer = Union[str, int, Mapping[str, float], None]

class ConfigError(ValueError):
    """A config, task or option that cannot work; the message names the field."""

class CascadeError(Exception):
    """The cascade or its expert failed at run time."""

class Answer:
    """How one item ended."""

    label: Optional[str]
    label_index: Optional[int]
    #: A level's name, "llm", or None.
    answered_by: Optional[str]
    #: The answering student's probability per label.
    probs: Optional[list[float]]
    status: Literal["ok", "expert_unavailable", "error", "bad_input"]
    error: Optional[str]

class Deferred:
    """An item no student answered (or an audit): ask the LLM for `text`."""

    text: str
    #: An audit: a student answered; the LLM's label is compared (never learned)
    #: and given when they differ.
    audit: bool

class Run(Iterator[dict[str, Any]]):
    """The records of `Cascade.run`, one per item, in input order."""

    def __iter__(self) -> "Run": ...
    def __next__(self) -> dict[str, Any]: ...
    def close(self) -> None:
        """Ends the run; the session goes back to the cascade."""
    def __enter__(self) -> "Run": ...
    def __exit__(self, *args: Any) -> bool: ...

class Cascade:
    """Students in front of an LLM, learning from its answers.

    `config`: a TOML file's path or a dict of its fields (errors name the
    field). `task`: a preset (imdb, hatespeech, isear, fever) or a task file;
    or `labels`. `models`: the folder model names resolve in ("models").
    `mu`, `seed`, `llm_budget`, `llm_rate` override the config's;
    `llm_budget` needs `stream_length`. `audit_rate`: the share of student
    answers also sent to the LLM (None: the deepest level's exploration
    floor). `on_expert_failure`: "student" (the deepest student answers) or
    "error".
    """

    def __init__(
        self,
        config: Union[str, os.PathLike[str], Mapping[str, Any]],
        *,
        task: Optional[str] = None,
        labels: Optional[list[str]] = None,
        models: Optional[Union[str, os.PathLike[str]]] = None,
        seed: Optional[int] = None,
        mu: Optional[float] = None,
        llm_budget: Optional[int] = None,
        llm_rate: Optional[float] = None,
        stream_length: Optional[int] = None,
        audit_rate: Optional[float] = None,
        on_expert_failure: Literal["student", "error"] = "student",
    ) -> None: ...
    @property
    def labels(self) -> list[str]: ...
    @property
    def levels(self) -> list[str]: ...
    def prefit(self, texts: list[str]) -> None:
        """Fits the LR students' TF-IDF statistics on a corpus up front."""
    def route(self, text: str) -> Union[Answer, Deferred]:
        """A student's `Answer`, or a `Deferred` for the LLM."""
    def learn(self, deferred: Deferred, answer: ExpertAnswer) -> Answer:
        """Settles a deferred item with the LLM's answer."""
    def predict_one(self, text: str) -> Union[Answer, Deferred]: ...
    def learn_one(self, deferred: Deferred, answer: ExpertAnswer) -> Answer: ...
    def run(
        self,
        items: Iterable[Union[str, Mapping[str, Any]]],
        expert: Union[
            Callable[[str], ExpertAnswer],
            Callable[[str], Awaitable[ExpertAnswer]],
            Literal["recorded", "openai", "local"],
        ],
        *,
        max_in_flight: int = 1,
        **options: Any,
    ) -> Run:
        """Yields `{"id", "label", "answered_by", "probs", "status", "error"?}`
        per item. Built-in experts' options: recorded (data, field="gpt35",
        delay_ms), openai (config, base_url, model), local (model,
        max_text_tokens, cache)."""
    def metrics(self) -> dict[str, Any]: ...
    def save_state(self) -> bytes:
        """The whole learner, in the format of `cascade run`'s checkpoint."""
    def load_state(self, state: bytes) -> None: ...

def read_recorded_stream(
    data: Union[str, os.PathLike[str]],
    task: str,
    stream: str = "test",
    field: str = "gpt35",
) -> list[dict[str, Any]]:
    """A recorded benchmark stream as `{"id", "text", "gold", "llm"}` dicts
    (labels by name; None where there is none). `stream`: "test", "all", or a
    file of ids."""
