"""The README documents what the code offers: every setting, every metric, every error code."""

import re

from service import errors
from service.metrics import Metrics
from service.settings import Settings
from tests.conftest import REPO

README = (REPO / "README.md").read_text()


def test_every_setting_is_documented_with_its_default():
    for name, field in Settings.model_fields.items():
        row = re.search(rf"^\| `VAE_{name.upper()}` \| `([^`]*)` \|", README, re.MULTILINE)
        assert row, f"VAE_{name.upper()} is not in the README's settings table"
        default, shown = field.default, row.group(1)
        if isinstance(default, bool):
            assert shown == str(default).lower(), name
        elif isinstance(default, int | float):
            assert float(shown) == default, name
        else:
            assert shown == str(default), name


def test_every_metric_is_documented():
    for family in Metrics().registry.collect():
        name = family.name + ("_total" if family.type == "counter" else "")
        assert f"`{name}`" in README, name


def test_every_error_code_is_documented():
    codes = {cls.code for cls in vars(errors).values()
             if isinstance(cls, type) and issubclass(cls, errors.ServiceError) and cls is not errors.ServiceError}
    for code in codes:
        assert f"`{code}`" in README, code
