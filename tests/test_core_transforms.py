import ast
import math
import warnings
from pathlib import Path

import numpy as np
import pytest

from openrlhf_infalign.core import transforms
from openrlhf_infalign.core.transforms import parse_transform, tabulated_transform

SPECS = [
    "identity",
    "exp:t=10",
    "exp:t=0.5",
    "exp:t=200",
    "exp:t=5000",
    "negexp:t=10",
    "negexp:t=200",
    "log",
    "log:eps=0.001",
    "power:k=2",
    "power:k=0.5",
]


@pytest.mark.parametrize("spec", SPECS)
def test_maps_unit_interval_monotone_and_roundtrips(spec):
    tr = parse_transform(spec)
    u = np.linspace(0, 1, 10001)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no overflow / divide warnings even for huge t
        v = tr(u)
    assert v.shape == u.shape and v.dtype == np.float64
    assert np.all(np.isfinite(v))
    assert v[0] == pytest.approx(0.0, abs=1e-12) and v[-1] == pytest.approx(1.0, abs=1e-12)
    assert np.all((v >= 0) & (v <= 1))
    assert np.all(np.diff(v) >= -1e-15)
    assert parse_transform(tr.spec).spec == tr.spec
    assert tr(np.array([[0.25, 0.5], [0.75, 1.0]])).shape == (2, 2)  # vectorised over any shape


def test_closed_forms():
    u = np.linspace(0, 1, 101)
    np.testing.assert_allclose(parse_transform("exp:t=3")(u), (np.exp(3 * u) - 1) / (np.exp(3) - 1), rtol=1e-12)
    np.testing.assert_allclose(
        parse_transform("negexp:t=3")(u), (1 - np.exp(-3 * u)) / (1 - np.exp(-3)), rtol=1e-12, atol=1e-15
    )
    np.testing.assert_allclose(parse_transform("power:k=3")(u), u**3)
    assert parse_transform("exp:t=10").spec == "exp:t=10" and parse_transform("exp:t=6.8312").spec == "exp:t=6.831"
    # scale: normalised = scale * raw + offset, so beta_raw = beta / scale
    tr = parse_transform("exp:t=3")
    assert tr.scale == pytest.approx(1 / (math.e**3 - 1))
    assert tr.raw_beta(0.2) == pytest.approx(0.2 * (math.e**3 - 1))


def test_log_clips_for_training_but_theory_sees_exact_log():
    tr = parse_transform("log")
    L = -math.log(1e-6)
    assert tr.scale == pytest.approx(1 / L)
    u = np.array([0.0, 1e-9, 1e-6, 0.5, 1.0])
    np.testing.assert_allclose(tr(u), [0, 0, 0, 1 + math.log(0.5) / L, 1], atol=1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        phi = tr.phi(u)
    assert phi[0] == -math.inf and phi[1] < 0  # exact log below eps
    np.testing.assert_allclose(phi[2:], tr(u)[2:], atol=1e-12)
    assert parse_transform("log:eps=0.001").scale == pytest.approx(1 / math.log(1000))


@pytest.mark.parametrize(
    "spec,fragment",
    [
        ("exp:t=-1", "positive"),
        ("exp:t=0", "positive"),
        ("exp", "missing t"),
        ("exp:t=abc", "not a number"),
        ("exp:k=2", "unknown parameter"),
        ("exp:t", "key=value"),
        ("negexp:t=inf", "positive finite"),
        ("power:k=0", "positive"),
        ("identity:t=1", "no parameters"),
        ("log:eps=2", "(0, 1)"),
        ("sigmoid", "unknown transform"),
        ("", "empty"),
        ("optimal", "resolve_transform"),
    ],
)
def test_bad_specs_give_one_line_reasons(spec, fragment):
    with pytest.raises(ValueError) as e:
        parse_transform(spec)
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_tabulated_transform_interpolates_and_normalises():
    tr = tabulated_transform(np.array([0.0, 0.5, 1.0]), np.array([-2.0, 0.0, 2.0]))
    np.testing.assert_allclose(tr(np.array([0, 0.25, 0.5, 1])), [0, 0.25, 0.5, 1])
    assert tr.scale == pytest.approx(0.25)
    with pytest.raises(ValueError):
        tabulated_transform(np.array([0.0, 0.0, 1.0]), np.array([0.0, 1.0, 2.0]))


def test_transforms_imports_no_other_module_of_the_package():
    # theory and planning build on transforms; any import back (even one inside a function) would be a circle.
    tree = ast.parse(Path(transforms.__file__).read_text())
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not [m for m in names if m.startswith("openrlhf_infalign")]
