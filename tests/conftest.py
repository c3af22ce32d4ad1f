"""Shared test set-up."""

import sys

import pytest


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """accelerate keeps one process-wide state (mixed precision among it) that a later
    `Accelerator` with other settings may not change; a training run is one process in real use,
    so each test starts from a clean state, as accelerate's own tests do."""
    yield
    state = sys.modules.get("accelerate.state")
    if state is not None:
        state.AcceleratorState._reset_state()
