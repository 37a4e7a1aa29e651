"""Test configuration: hypothesis profiles.

CI (``FXPRUNE_CI=1``, set by ``.ci/run``) uses a derandomised profile so a run is reproducible; locally the
default profile explores new examples each run (and keeps failures in ``.hypothesis/``).
"""

import os

from hypothesis import HealthCheck, settings

settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
if os.environ.get("FXPRUNE_CI"):
    settings.load_profile("ci")
