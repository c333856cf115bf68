"""hyclora.compat: TESTED is the one source of truth for the supported versions (setup.cfg and
both pinned requirement files agree with it), and check_versions refuses / warns / stays silent
as documented."""

import configparser
import re
import warnings

import pytest
from packaging.requirements import Requirement

from hyclora import compat
from hyclora.compat import TESTED, UntestedVersionWarning, check_versions, version_tuple

from helpers.repo import REPO


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirements_file(name: str):
    reqs = {}
    for line in (REPO / name).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            reqs[_norm(req.name)] = req
    return reqs


def _pins(name: str):
    """{distribution: version} of the ``==`` pins of a requirements file."""
    pins = {}
    for dist, req in _requirements_file(name).items():
        specs = list(req.specifier)
        if len(specs) == 1 and specs[0].operator == "==":
            pins[dist] = specs[0].version
    return pins


def _install_requires():
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    reqs = {}
    for line in cfg["options"]["install_requires"].splitlines():
        line = line.strip()
        if line:
            req = Requirement(line)
            reqs[_norm(req.name)] = req
    return reqs


# -- TESTED against the packaging files --------------------------------------------------------

@pytest.mark.parametrize("dist", sorted(TESTED))
def test_setup_cfg_range_is_the_tested_range(dist):
    low, high = TESTED[dist]
    req = _install_requires()[_norm(dist)]
    assert {(s.operator, s.version) for s in req.specifier} == {(">=", low), ("<=", high)}, (
        f"setup.cfg's {req} is not the tested range {low}-{high} of hyclora.compat.TESTED"
    )


@pytest.mark.parametrize("dist", sorted(TESTED))
def test_dev_pins_are_the_low_end(dist):
    pin = _pins("requirements-dev.txt").get(_norm(dist))
    if dist == "torch":  # the low end is the GPU image's torch (2.11, CUDA); CI's CPU wheel is 2.13
        low, high = TESTED[dist]
        assert version_tuple(low) <= version_tuple(pin) <= version_tuple(high)
        return
    assert pin == TESTED[dist][0]


@pytest.mark.parametrize("dist", sorted(TESTED))
def test_latest_pins_are_the_high_end(dist):
    assert _pins("requirements-latest.txt").get(_norm(dist)) == TESTED[dist][1]


def test_latest_pins_every_library_the_dev_set_pins():
    """The newest set pins exactly what the pinned set pins (plus deepspeed, which the Makefile
    installs separately for .venv), so no library drifts to whatever pip picks that day."""
    dev, latest = _pins("requirements-dev.txt"), _pins("requirements-latest.txt")
    assert set(dev) <= set(latest), sorted(set(dev) - set(latest))
    assert set(_requirements_file("requirements-dev.txt")) <= set(_requirements_file("requirements-latest.txt"))


def test_tested_ranges_are_ordered():
    for dist, (low, high) in TESTED.items():
        assert version_tuple(low) <= version_tuple(high), dist
        assert version_tuple(low)[:1] == version_tuple(high)[:1], f"{dist}: one major version"


# -- version_tuple -------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "text, expected",
    [
        ("5.25.0", (5, 25, 0)),
        ("2.14.1+cu130", (2, 14, 1)),
        ("2.13.0+cpu", (2, 13, 0)),
        ("5.26.0.dev0", (5, 26, 0)),
        ("1.17.0rc1", (1, 17, 0)),
        ("0.21", (0, 21)),
        ("3.8.0.post1", (3, 8, 0)),
    ],
)
def test_version_tuple(text, expected):
    assert version_tuple(text) == expected


# -- check_versions ------------------------------------------------------------------------------

def _silent(installed):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_versions(installed=installed)


@pytest.mark.parametrize("dist", sorted(TESTED))
def test_silent_inside_the_range(dist):
    low, high = TESTED[dist]
    _silent({dist: low})
    _silent({dist: high})
    _silent({dist: high + "+cu130"})  # local build labels are not newer releases


def test_silent_for_the_pinned_sets_and_local_builds():
    _silent({dist: low for dist, (low, _) in TESTED.items()})
    _silent({dist: high for dist, (_, high) in TESTED.items()})
    _silent({"torch": "2.13.0+cpu", "transformers": "5.20.1", "peft": "0.21.1", "accelerate": "1.15.2"})
    _silent({"torch": "2.13"})  # short forms compare as .0, not as older than 2.13.0


def test_missing_distributions_are_skipped():
    _silent({})
    _silent({"torch": None})


def test_installed_environment_is_tested():
    """The suite runs on a tested set (make test: the low end, make test-latest: the high end)."""
    _silent(None)


@pytest.mark.parametrize(
    "dist, version",
    [
        ("torch", "2.10.1"),
        ("torch", "1.13.0"),
        ("transformers", "5.16.2"),
        ("transformers", "4.57.1"),
        ("peft", "0.20.0"),
        ("accelerate", "1.14.0"),
    ],
)
def test_older_is_refused_naming_the_tested_range(dist, version):
    low, high = TESTED[dist]
    with pytest.raises(RuntimeError) as info:
        check_versions(installed={dist: version})
    message = str(info.value)
    assert f"{dist} {version} is not supported" in message
    assert f"{dist} {low}-{high}" in message
    assert f"'{dist}>={low},<={high}'" in message


@pytest.mark.parametrize(
    "dist, version",
    [("torch", "3.0.0"), ("transformers", "6.0.0"), ("transformers", "6.0.0.dev0"), ("peft", "1.0.0"), ("accelerate", "2.0.0")],
)
def test_another_major_is_refused(dist, version):
    low, high = TESTED[dist]
    with pytest.raises(RuntimeError, match=re.escape(f"{dist} {low}-{high}")):
        check_versions(installed={dist: version})


@pytest.mark.parametrize(
    "dist, version",
    [
        ("transformers", "5.26.0"),
        ("transformers", "5.26.0.dev0"),
        ("torch", "2.15.0+cu130"),
        ("peft", "0.22.0"),
        ("accelerate", "1.17.0"),
        ("transformers", "5.25.1"),  # a newer patch release is untested too
    ],
)
def test_newer_minor_warns(dist, version):
    high = TESTED[dist][1]
    with pytest.warns(UntestedVersionWarning, match=re.escape(f"newest tested release ({high})")) as record:
        check_versions(installed={dist: version})
    assert len(record) == 1
    assert compat.tested_range_text() in str(record[0].message)
