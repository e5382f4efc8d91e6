"""Out-of-distribution inputs, the standard test for likelihood models (Nalisnick et al. 2019): a
Fashion-MNIST model finds MNIST *more* likely than its own test set, and an MNIST model finds blank,
constant and other simple images more likely than digits. The typicality score must flag them all;
measured as `python -m bench.ood` measures them for the README, on a quick (2-epoch) MLP."""

from __future__ import annotations

import pytest

from bench.ood import pair_aurocs
from tests.conftest import SHARED
from training.data import load_mnist

MNIST, FASHION = SHARED / "data" / "mnist", SHARED / "data" / "fashion-mnist"
pytestmark = [pytest.mark.slow, pytest.mark.skipif(not (MNIST.is_dir() and FASHION.is_dir()),
                                                   reason="../shared/data/mnist or fashion-mnist is not present")]


@pytest.fixture(scope="module")
def datasets():
    mnist, fashion = load_mnist(MNIST), load_mnist(FASHION)
    mnist.name, fashion.name = "mnist", "fashion-mnist"
    return mnist, fashion


def test_a_fashion_model_flags_mnist_with_typicality_where_the_elbo_fails(datasets):
    mnist, fashion = datasets
    auroc = pair_aurocs(fashion, mnist, epochs=2, arch="mlp")["mnist test"]
    print({s: round(v, 3) for s, v in auroc.items()})
    assert auroc["elbo"] < 0.5  # the known failure: digits look more normal than clothing
    assert auroc["typicality"] >= 0.95


def test_an_mnist_model_flags_fashion_and_simple_inputs_with_typicality(datasets):
    mnist, fashion = datasets
    auroc = pair_aurocs(mnist, fashion, epochs=2, arch="mlp")
    print({f"{s}/{k}": round(v, 3) for k, row in auroc.items() for s, v in row.items()})
    assert auroc["blank"]["elbo"] < 0.05  # a blank image looks the most normal of all to the ELBO
    for kind in ("fashion-mnist test", "blank", "constant", "blurred", "digits 8x8 upscaled", "inverted"):
        assert auroc[kind]["typicality"] >= 0.95, kind
        assert auroc[kind]["complexity"] >= 0.9 or kind == "fashion-mnist test", kind
