"""Shared fixtures: the repository root (configs, tasks, the `cascade`
binary) and the recorded ISEAR stream."""

import os
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[3]
DATA = ROOT.parent / "shared" / "data"


@pytest.fixture(autouse=True)
def at_repo_root(monkeypatch):
    """Configs name models and files relative to the repository root."""
    monkeypatch.chdir(ROOT)


@pytest.fixture(scope="session")
def isear():
    import cascade_stream as cs

    return cs.read_recorded_stream(str(DATA / "isear"), task="isear")


@pytest.fixture(scope="session")
def cascade_bin():
    """The CLI built by the workspace's tests (`cargo nextest run --release`)."""
    path = pathlib.Path(os.environ.get("CASCADE_BIN", ROOT / "target" / "release" / "cascade"))
    assert path.exists(), f"{path} is missing: build the workspace first (cargo build --release)"
    return path
