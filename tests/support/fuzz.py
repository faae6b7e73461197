"""hypothesis settings for the fuzzing tests."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings


def fuzz_settings(request: pytest.FixtureRequest, small: int, large: int) -> settings:
    """`small` derandomized examples in make test, `large` random ones under --torture;
    never a database in the repository. The health checks a fuzzer of hostile input
    trips by design (big or rejected examples, a function-scoped fixture) are off."""
    torture = request.config.getoption("--torture")
    return settings(
        max_examples=large if torture else small,
        deadline=None,
        database=None,
        derandomize=not torture,
        suppress_health_check=[
            HealthCheck.function_scoped_fixture,
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.large_base_example,
            HealthCheck.filter_too_much,
        ],
    )
