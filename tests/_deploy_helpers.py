"""Pinned versions as the repository states them (pyproject.toml, constraints.txt, Makefile), for the deploy/
and k8s/ tests that check images and configs agree with them."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def project_version() -> str:
    return re.search(r'(?m)^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text()).group(1)


def pinned_ray() -> str:
    return re.search(r'"ray\[[^\]]*\]==([^"]+)"', (ROOT / "pyproject.toml").read_text()).group(1)


def constraints() -> dict[str, str]:
    """name (normalised) -> pinned version."""
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        name, sep, version = line.strip().partition("==")
        if sep:
            pins[normalise(name)] = version
    return pins


def offline_packages() -> list[str]:
    """The Makefile's OFFLINE_PKGS (the offline model and corpora)."""
    return re.search(r"(?m)^OFFLINE_PKGS := (.+)$", (ROOT / "Makefile").read_text()).group(1).split()


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()
