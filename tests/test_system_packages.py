"""Tests that need Debian packages skip without them, naming the package; under CI they fail; CI runs only `make test`."""

from __future__ import annotations

from pathlib import Path

import pytest

import conftest

REPO = Path(__file__).resolve().parent.parent


def test_a_missing_package_skips_with_its_name_and_install_command(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.setattr(conftest, "present", lambda probe: probe != "chromium")
    with pytest.raises(pytest.skip.Exception, match=r"needs the Debian package\(s\) chromium \(install: sudo apt-get install -y chromium"):
        conftest.require_system("chromium", "rsync")
    conftest.require_system("rsync")  # present: nothing happens


def test_under_ci_a_missing_package_fails(monkeypatch):
    monkeypatch.setenv("CI", "true")
    monkeypatch.setattr(conftest, "present", lambda probe: False)
    with pytest.raises(pytest.fail.Exception, match="openssh-server .*under CI every system package must be installed"):
        conftest.require_system("sshd")


def test_ci_runs_the_readmes_test_command_and_make_test_installs_the_packages():
    ci = [line for line in (REPO / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    assert ci[-1] == "make test"
    two_commands = (REPO / "README.md").read_text().split("\n## Two commands\n", 1)[1].split("\n## ")[0]
    assert "make test" in two_commands
    makefile = (REPO / "Makefile").read_text()
    assert "test: $(STAMP) system-packages" in makefile and "./.ci/system-packages.sh" in makefile
    script = (REPO / ".ci" / "system-packages.sh").read_text()
    for package in {package for package, _ in conftest.SYSTEM_TOOLS.values()}:
        assert package in script, package
