"""Settings for the whole test session."""

from hypothesis import settings

# Property tests check logic, not speed: Hypothesis's per-example deadline (200 ms) fails them at random on a
# loaded 2-core box (CI runs engines beside them). Example counts stay at the default.
settings.register_profile("nebula", deadline=None)
settings.load_profile("nebula")
