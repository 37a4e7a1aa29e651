"""Test configuration: hypothesis profiles.

CI (``FXPRUNE_CI=1``, set by ``.ci/run``) uses a derandomised profile so a run is reproducible; locally the
default profile explores new examples each run (and keeps failures in ``.hypothesis/``).
"""

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
if os.environ.get("FXPRUNE_CI"):
    settings.load_profile("ci")


@pytest.fixture
def one_thread():
    """Tiny tensors: one thread is much faster than several on a shared machine (``usefixtures``)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
