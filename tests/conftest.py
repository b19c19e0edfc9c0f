"""Fixtures and settings shared by every test tier.

Property tests (hypothesis) are reproducible where it matters: under CI (``CI`` set) they run
derandomised with no example database, so a run never depends on the last run's failures or on
the random seed; locally they explore randomly and remember failures in ``.hypothesis/``
(ignored by git).
"""

from __future__ import annotations

import os

from hypothesis import settings

settings.register_profile("ci", derandomize=True, database=None, deadline=None)
settings.register_profile("dev", deadline=None)
settings.load_profile(
    os.environ.get("HEADSCOPE_HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev")
)
