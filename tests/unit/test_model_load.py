"""A load request's derived fields: filled only where the request left them open, and undone for comparison."""

from __future__ import annotations

import pytest

from nebula.core.model import ModelSpec
from nebula.core.model_load import as_requested, derived_fields, with_derived
from nebula.core.profile import ModelProfile

PROFILE = ModelProfile(architecture="Qwen2ForCausalLM", derived={"weight_bytes": "total_size in the index"})
SIZING = {"gpus_per_replica": (2, "smallest power of two that fits"), "gpu_memory_mib": (40_000, "estimate"),
          "tensor_parallel_size": (2, "= gpus_per_replica"), "max_model_len": (32768, "model's own limit")}


def request(**fields: object) -> ModelSpec:
    return ModelSpec.from_dict({"name": "qwen", "source": "/models/qwen"} | fields)


def test_open_fields_are_filled_and_say_why() -> None:
    spec = with_derived(request(), PROFILE, SIZING)
    assert (spec.gpus_per_replica, spec.gpu_memory_mib, spec.tensor_parallel_size, spec.max_model_len) == (
        2, 40_000, 2, 32768)
    assert derived_fields(spec) == {k: why for k, (_, why) in SIZING.items()}
    assert spec.profile is not None and spec.profile.derived["weight_bytes"] == "total_size in the index"


def test_a_declared_field_is_never_overwritten() -> None:
    spec = with_derived(request(gpus_per_replica=4, max_model_len=4096), PROFILE, SIZING)
    assert spec.gpus_per_replica == 4 and spec.max_model_len == 4096
    assert "gpus_per_replica" not in derived_fields(spec) and "max_model_len" not in derived_fields(spec)


def test_the_same_request_compares_equal_to_the_stored_spec_however_it_was_sized() -> None:
    req = request(replicas=2)
    stored = ModelSpec.from_dict(with_derived(req, PROFILE, SIZING).to_dict())  # through its JSON form
    assert stored != req
    assert as_requested(stored) == req
    resized = with_derived(req, PROFILE, SIZING | {"gpus_per_replica": (4, "less free memory now")})
    assert as_requested(resized) == as_requested(stored)


def test_a_request_that_differs_still_differs() -> None:
    stored = with_derived(request(), PROFILE, SIZING)
    assert as_requested(stored) != request(max_model_len=1024)


def test_only_sizing_fields_can_be_filled() -> None:
    with pytest.raises(ValueError):
        with_derived(request(), PROFILE, {"source": ("/elsewhere", "no")})
