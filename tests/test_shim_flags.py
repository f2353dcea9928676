"""containerd-shim-runphi-v2's flags, parsed as Go's flag package parses a shim's command line."""

from __future__ import annotations

import pytest

from runphi.errors import UsageError
from runphi.shim.main import parse_flags

CONTAINERD_START = ["-namespace", "k8s.io", "-address", "/run/containerd/containerd.sock", "-publish-binary",
                    "/usr/bin/containerd", "-id", "abc", "-debug", "start"]


def test_containerds_start_line():
    flags = parse_flags(CONTAINERD_START)
    assert (flags.namespace, flags.address, flags.publish_binary, flags.id, flags.debug, flags.action) == (
        "k8s.io", "/run/containerd/containerd.sock", "/usr/bin/containerd", "abc", True, "start")
    assert (flags.bundle, flags.socket, flags.version) == ("", "", False)


def test_containerds_delete_line_with_bundle():
    flags = parse_flags(["-namespace", "n", "-address", "/a", "-publish-binary", "/c", "-id", "x",
                         "-bundle", "/run/b/x", "delete"])
    assert (flags.bundle, flags.action, flags.debug) == ("/run/b/x", "delete", False)


@pytest.mark.parametrize(("argv", "debug"), [(["-debug=false"], False), (["--debug=true"], True),
                                             (["-debug=1"], True), (["--debug"], True)])
def test_go_boolean_forms(argv, debug):
    assert parse_flags([*argv, "start"]).debug is debug


def test_value_after_equals_and_double_dash():
    flags = parse_flags(["--namespace=ns", "-id=a=b", "--", "delete"])
    assert (flags.namespace, flags.id, flags.action) == ("ns", "a=b", "delete")


def test_version_alone():
    flags = parse_flags(["-v"])
    assert flags.version and flags.action is None


@pytest.mark.parametrize(("argv", "says"), [
    (["-nope", "start"], "flag provided but not defined: -nope"),
    (["-id"], "flag needs an argument: -id"),
    (["-debug=maybe", "start"], "invalid boolean value 'maybe' for flag -debug"),
    (["start", "delete"], "unexpected arguments"),
    (["stop"], "unexpected arguments"),
])
def test_bad_lines_are_one_usage_error(argv, says):
    with pytest.raises(UsageError, match=says):
        parse_flags(argv)
