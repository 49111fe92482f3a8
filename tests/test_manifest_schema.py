"""The manifest's schema follows docs/protocol.md §10: the feature reference fields added for the drift decision
(``kind``, ``nan``, ``outside``) make a manifest ``edgeherd.manifest/2``; without them it stays ``/1``, byte for
byte, so agents that speak only /1 keep taking it."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from protocol import Manifest, encode_model
from protocol.manifest import MANIFEST_SCHEMA, MANIFEST_SCHEMA_2, FeatureReference, ReferenceProfile, schema_for
from tests.samples import manifest


def _with(reference: ReferenceProfile, schema: str) -> Manifest:
    fields = manifest().model_dump(by_alias=True) | {"reference": reference.model_dump(), "schema": schema}
    return Manifest.model_validate(fields, strict=False)


def _profile(**extra: object) -> ReferenceProfile:
    return ReferenceProfile(kind="raw", n=100, features=[
        FeatureReference(name="f0", edges=[0.0, 1.0, 2.0], counts=[50, 50], mean=1.0, std=0.5, **extra)])


def test_a_profile_without_the_new_fields_is_schema_1_and_encodes_as_before():
    plain = _profile()
    assert schema_for(plain) == MANIFEST_SCHEMA
    m = _with(plain, MANIFEST_SCHEMA)
    assert b'"schema":"edgeherd.manifest/1"' in encode_model(m)
    assert m.reference is not None
    assert b'"kind"' not in encode_model(m.reference.features[0]) and b'"outside"' not in encode_model(m)


@pytest.mark.parametrize("extra", [{"kind": "discrete"}, {"nan": 3}, {"outside": 2}])
def test_a_profile_with_a_new_field_needs_schema_2(extra):
    profile = _profile(**extra)
    assert schema_for(profile) == MANIFEST_SCHEMA_2
    assert _with(profile, MANIFEST_SCHEMA_2).schema_ == MANIFEST_SCHEMA_2
    with pytest.raises(ValidationError, match=r"has schema edgeherd\.manifest/2"):
        _with(profile, MANIFEST_SCHEMA)
    with pytest.raises(ValidationError, match="does not use"):
        _with(_profile(), MANIFEST_SCHEMA_2)


def _with_golden(values: int, schema: str) -> Manifest:
    fields = manifest().model_dump(by_alias=True) | {"golden": {"inputs": [[1.0] * values]}, "schema": schema}
    return Manifest.model_validate(fields, strict=False)


def test_golden_inputs_of_raw_pixels_need_schema_3_and_stay_capped():
    """An image model's golden input (raw pixels) may hold up to 65,536 values from schema /3 on; at most 16,384
    before, so an agent that speaks only /1 and /2 refuses it naming the schema instead of a list length."""
    from protocol.manifest import GOLDEN_VALUES_2, GOLDEN_VALUES_3, MANIFEST_SCHEMA_3, GoldenSet

    assert schema_for(None, GoldenSet(inputs=[[0.0] * GOLDEN_VALUES_2])) == MANIFEST_SCHEMA
    assert schema_for(None, GoldenSet(inputs=[[0.0] * (GOLDEN_VALUES_2 + 1)])) == MANIFEST_SCHEMA_3
    assert _with_golden(3 * 112 * 112, MANIFEST_SCHEMA_3).schema_ == MANIFEST_SCHEMA_3
    too_big = r"golden inputs of more than 16384 values has schema edgeherd\.manifest/3"
    with pytest.raises(ValidationError, match=too_big):
        _with_golden(3 * 112 * 112, MANIFEST_SCHEMA)
    with pytest.raises(ValidationError, match=r"at most 16384 values each has schema edgeherd\.manifest/1"):
        _with_golden(10, MANIFEST_SCHEMA_3)
    with pytest.raises(ValidationError, match="65536"):
        _with_golden(GOLDEN_VALUES_3 + 1, MANIFEST_SCHEMA_3)
