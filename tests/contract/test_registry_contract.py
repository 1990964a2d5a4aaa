"""A backend added to ``ropekern.backends._REGISTRY`` gets the whole contract with no test written
for it: registered here for the length of one test (a wrapper around the reference, so it must
pass), the contract directory is collected and run again in this process, and every contract test
must have run on it and passed."""

from __future__ import annotations

from pathlib import Path

import pytest

import ropekern as rk
from ropekern import backends

from contract_support import contract_backends

NAME = "throwaway"


class _Wrapper:
    """A new backend as the registry sees one: each op delegates to the ``torch`` reference."""

    name = NAME

    def __getattr__(self, attr):
        return getattr(backends.get_backend("torch"), attr)


THROWAWAY = _Wrapper()


@pytest.fixture
def registered(monkeypatch):
    monkeypatch.setitem(backends._REGISTRY, NAME, f"{__name__}:THROWAWAY")
    backends.load.cache_clear()  # load() caches per name: forget what it knew without the entry
    yield NAME
    monkeypatch.undo()
    backends.load.cache_clear()


class _Recorder:
    """Plugin of the inner run: every collected contract test (before ``-k`` deselects it) as
    (backend, test and its other parameters), and the outcome of each one that ran."""

    def __init__(self):
        self.collected, self.outcomes = [], {}

    @pytest.hookimpl(tryfirst=True)
    def pytest_collection_modifyitems(self, items):
        for item in items:
            params = dict(item.callspec.params)
            backend = params.pop("backend")
            self.collected.append((backend, item.path.name, item.originalname, repr(sorted(params.items()))))

    def pytest_runtest_logreport(self, report):
        if report.when == "call" or report.outcome != "passed":
            self.outcomes[report.nodeid] = report.outcome


def test_a_registered_backend_gets_the_whole_contract(registered):
    assert registered in contract_backends() and rk.available_backends()[registered] is True
    recorder = _Recorder()
    here = Path(__file__)
    args = [str(here.parent), f"--ignore={here}", "-k", registered, "-q", "-p", "no:cacheprovider"]
    assert pytest.main(args, plugins=[recorder]) == pytest.ExitCode.OK
    per_backend = {}
    for backend, *test in recorder.collected:
        per_backend.setdefault(backend, set()).add(tuple(test))
    assert set(per_backend) == set(contract_backends())
    assert per_backend[registered] == per_backend["torch"]  # the whole contract, every parameter
    assert len(recorder.outcomes) == len(per_backend[registered])  # and all of it ran on the newcomer
    assert set(recorder.outcomes.values()) == {"passed"}
