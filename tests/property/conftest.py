"""Hypothesis profile for the property tests: derandomized (CI is never flaky), no deadline
(the first call of a jitted function compiles), few examples (the whole set runs in seconds)."""
from hypothesis import HealthCheck, Phase, settings

settings.register_profile("jaxeff", derandomize=True, deadline=None, max_examples=25,
                          suppress_health_check=[HealthCheck.too_slow,
                                                 HealthCheck.function_scoped_fixture],
                          print_blob=True,
                          # no 'explain' phase: its line tracing costs minutes on a failure
                          phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink])
settings.load_profile("jaxeff")
