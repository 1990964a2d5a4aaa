"""Every contract test that takes ``backend`` runs once per registered backend (``contract_backends``,
read from ``ropekern.backends._REGISTRY`` at collection; the CPU backend once per kernel unit), as
a ``Target``; a backend that cannot run on this machine is skipped with its reason."""

import pytest

from contract_support import Target, contract_backends


def pytest_generate_tests(metafunc):
    if "backend" in metafunc.fixturenames:
        metafunc.parametrize("backend", contract_backends(), indirect=True)


@pytest.fixture
def backend(request, monkeypatch) -> Target:
    name, _, unit = request.param.partition("-")
    if unit:  # a CPU kernel unit, forced for this test
        monkeypatch.setenv("ROPEKERN_CPU_ISA", unit)
    return Target.open(name)
