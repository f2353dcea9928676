"""The registry of backend setups the contract runs against, and the fixtures built on it.

A backend joins the contract with ONE entry in :data:`BACKEND_SETUPS`: a
:class:`BackendSetup` whose ``machine`` context manager brings up what the backend
runs on (once per test module; it may ``pytest.skip`` with the reason when this host
cannot) and yields an object whose ``target(base)`` makes one test's
:class:`~tests.backend_contract.contract.BackendTarget` in the directory ``base``.
Marks on the entry (``qemu``, ...) select or deselect the setup as a whole.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.test_lifecycle_harness import subreaper  # noqa: F401  (fixture: the test process adopts monitors)

from . import jailhouse_sim, kvm
from .contract import BackendTarget, RuntimeCli


@dataclass(frozen=True)
class BackendSetup:
    """One backend setup: its id and how to bring up its machine (see the module docstring)."""

    name: str
    machine: Callable[[pytest.FixtureRequest], AbstractContextManager[Any]]


BACKEND_SETUPS = [
    pytest.param(BackendSetup("jailhouse-script", jailhouse_sim.script_machine), id="jailhouse-script"),
    pytest.param(BackendSetup("jailhouse-qemu", jailhouse_sim.qemu_machine), id="jailhouse-qemu",
                 marks=pytest.mark.qemu),
    pytest.param(BackendSetup("kvm", kvm.kvm_machine), id="kvm", marks=pytest.mark.qemu),
]


@pytest.fixture(scope="module", params=BACKEND_SETUPS)
def backend_machine(request: pytest.FixtureRequest, subreaper) -> Iterator[Any]:  # noqa: F811
    """The running machine of one backend setup, shared by the module's tests of that setup."""
    setup: BackendSetup = request.param
    with setup.machine(request) as machine:
        yield machine


@pytest.fixture
def target(backend_machine, tmp_path: Path) -> Iterator[BackendTarget]:
    """This test's view of the backend setup; afterwards every cell and injection it left is gone."""
    made = backend_machine.target(tmp_path)
    try:
        yield made
    finally:
        made.scrub()


@pytest.fixture
def cli(target: BackendTarget, tmp_path: Path) -> Iterator[RuntimeCli]:
    """The ``runphi`` CLI against ``target``; afterwards its containers are force-deleted, monitors reaped."""
    runtime = RuntimeCli(tmp_path, target.env)
    try:
        yield runtime
    finally:
        runtime.close()
