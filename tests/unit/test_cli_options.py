"""`vc run` / `vc create` options: the vCPU rules (katautils' limits, refused when exceeded)."""

from __future__ import annotations

import pytest

from virtcontainers.cli.options import vcpus
from virtcontainers.errors import ConfigError


@pytest.fixture
def two_cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("os.cpu_count", lambda: 2)


@pytest.mark.usefixtures("two_cpus")
def test_cpus_beyond_the_host_are_refused_naming_the_limit() -> None:
    """The bug: `vc run --cpus 9 --max-cpus 4` on a 2-CPU host booted 9 vCPUs."""
    with pytest.raises(ConfigError, match=r"--cpus 9 exceeds the limit of 2 vCPUs") as info:
        vcpus(9, 4)
    assert "this host has 2 CPUs" in str(info.value)
    assert info.value.field == "--cpus"


@pytest.mark.usefixtures("two_cpus")
def test_cpus_beyond_max_cpus_are_refused_naming_max_cpus() -> None:
    with pytest.raises(
        ConfigError, match=r"--cpus 2 exceeds the limit of 1 vCPUs \(--max-cpus 1\)"
    ):
        vcpus(2, 1)


@pytest.mark.usefixtures("two_cpus")
@pytest.mark.parametrize(
    ("cpus", "max_cpus", "expected"),
    [(1, 4, (1, 2)), (2, 4, (2, 2)), (1, 1, (1, 1)), (2, 2, (2, 2))],
)
def test_max_cpus_is_capped_by_the_host_as_katautils_does(
    cpus: int, max_cpus: int, expected: tuple[int, int]
) -> None:
    assert vcpus(cpus, max_cpus) == expected
