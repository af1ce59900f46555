import dataclasses

import pytest

from openrlhf_infalign.core.inference import InferenceProcedure


def test_inference_procedure_parse_and_spec():
    assert InferenceProcedure.parse("bon:4") == InferenceProcedure("bon", 4)
    assert InferenceProcedure.parse(" WON:16 ").spec == "won:16"
    assert InferenceProcedure.parse("standard") == InferenceProcedure("standard", 1)
    assert InferenceProcedure.parse("standard").spec == "standard"
    with pytest.raises(dataclasses.FrozenInstanceError):
        InferenceProcedure.parse("bon:4").n = 3
    for bad, frag in [("bon:0", ">= 1"), ("bon:x", "not an integer"), ("bon", "bon:N"), ("best:4", "bon:N")]:
        with pytest.raises(ValueError, match=frag) as e:
            InferenceProcedure.parse(bad)
        assert "\n" not in str(e.value)
