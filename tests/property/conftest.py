"""Hypothesis profiles for the property tests and fuzz targets in this package.

``ci`` (the default) keeps the whole package to a few seconds under ``pytest -n 2``: a fixed
number of examples per property, no per-example deadline (a shared 2-core machine stalls now and
then; a deadline miss there is noise, not a finding) and no example database (CI starts from a
clean clone, and a ``.hypothesis/`` directory in a tree several engineers share would replay
someone else's failures). Runs are not derandomised, so every CI run explores new inputs; a
failure prints the falsifying example and a ``@reproduce_failure`` blob, and
``--hypothesis-seed=N`` replays a whole run.

``HYPOTHESIS_PROFILE=long`` is for deeper local runs (50 times the examples);
``HYPOTHESIS_PROFILE=dev`` is a quick smoke run while editing.
"""

from __future__ import annotations

import os

from hypothesis import settings

CI_EXAMPLES = 200

settings.register_profile(
    "ci",
    max_examples=CI_EXAMPLES,
    deadline=None,
    database=None,
    derandomize=False,
    print_blob=True,
)
settings.register_profile(
    "long",
    max_examples=CI_EXAMPLES * 50,
    deadline=None,
    database=None,
    derandomize=False,
    print_blob=True,
)
settings.register_profile(
    "dev", max_examples=50, deadline=None, database=None, print_blob=True
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
