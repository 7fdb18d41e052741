"""Test-wide settings: one hypothesis profile for CI and local runs alike."""

from hypothesis import HealthCheck, settings

settings.register_profile(
    "colofs",
    max_examples=200,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile("colofs")
