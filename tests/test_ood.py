"""Out-of-distribution inputs for an MNIST model: the plain ELBO ranks simple inputs as *more* normal
than MNIST itself (Nalisnick et al. 2019); the complexity score (Serra et al. 2020) must not. Measured
on the MNIST test set against blank, constant, blurred, upscaled 8x8 and inverted images, as
`python -m bench.ood` measures them for the README."""

from __future__ import annotations

import pytest

from bench.ood import simple_input_aurocs
from tests.conftest import SHARED
from training.data import load_mnist

MNIST = SHARED / "data" / "mnist"
pytestmark = [pytest.mark.slow, pytest.mark.skipif(not MNIST.is_dir(), reason="../shared/data/mnist is not present")]


def test_the_complexity_score_flags_simple_inputs_where_the_elbo_fails():
    auroc = simple_input_aurocs(load_mnist(MNIST), epochs=2)
    print({f"{s}/{k}": round(v, 3) for k, row in auroc.items() for s, v in row.items()})
    assert auroc["blank"]["elbo"] < 0.05  # the known failure: a blank image looks the most normal of all
    for kind in ("blank", "constant", "blurred", "digits 8x8 upscaled", "inverted"):
        assert auroc[kind]["complexity"] >= 0.95, kind
