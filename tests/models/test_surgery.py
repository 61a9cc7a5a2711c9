"""qlr.models.surgery: replacing a submodule by its dotted path."""

from __future__ import annotations

import pytest
from torch import nn

from qlr.models.surgery import replace_linear


def test_replace_linear() -> None:
    model = nn.Sequential(nn.Sequential(nn.Linear(2, 2)))
    new = nn.Identity()
    old = replace_linear(model, "0.0", new)
    assert isinstance(old, nn.Linear) and model[0][0] is new
    with pytest.raises(AttributeError, match="no submodule"):
        replace_linear(model, "0.5", new)
    with pytest.raises(AttributeError, match="no submodule"):
        replace_linear(model, "0.0.weight_not_there", new)
