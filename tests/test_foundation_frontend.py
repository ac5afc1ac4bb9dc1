"""The user-facing frame: entry point registration, options parsing, mode handling."""

import subprocess
import sys
import textwrap
from importlib.metadata import entry_points

import pytest
import torch

from graphopt.options import Options, OptionsError, options_for, options_table


def test_entry_point_is_registered():
    (ep,) = [ep for ep in entry_points(group="torch_dynamo_backends") if ep.name == "graphopt"]
    assert ep.value == "graphopt.backend:graphopt_backend"
    assert "graphopt" in torch._dynamo.list_backends()


def test_compile_works_without_importing_graphopt():
    script = textwrap.dedent(
        """
        import sys, torch
        f = torch.compile(lambda x: torch.sin(x) * 2 + 1, backend="graphopt")
        x = torch.randn(5)
        torch.testing.assert_close(f(x), torch.sin(x) * 2 + 1)
        assert "graphopt.backend" in sys.modules
        print("ok")
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("ok")


def test_unknown_option_through_torch_compile_is_a_value_error_naming_valid_keys():
    f = torch.compile(lambda x: x + 1, backend="graphopt", options={"fusoin": True})
    with pytest.raises(ValueError, match=r"unknown graphopt option\(s\) 'fusoin'.*fusion.*debug_dir"):
        f(torch.randn(3))


def test_bad_value_names_the_valid_values():
    with pytest.raises(OptionsError, match=r"'fusion'.*True \| False"):
        Options.parse({"fusion": "yes"})
    with pytest.raises(OptionsError, match="debug_dir"):
        Options.parse({"debug_dir": 3})


def test_unsupported_mode_is_rejected_with_the_supported_ones():
    with pytest.raises(OptionsError, match="supported modes: 'default'"):
        options_for("fastest-please", None)
    f = torch.compile(lambda x: x + 1, backend="graphopt", mode="fastest-please")
    with pytest.raises(ValueError, match="does not support mode"):
        f(torch.randn(3))


def test_options_are_frozen_and_parsed():
    options = Options.parse({"fusion": False, "debug_dir": "/tmp/x"})
    assert options == Options(fusion=False, debug_dir="/tmp/x")
    with pytest.raises(AttributeError):
        options.fusion = True  # type: ignore[misc]


def test_readme_documents_every_option():
    from pathlib import Path

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    for name, *_ in options_table():
        assert f"`{name}`" in readme, f"README options table misses {name}"
