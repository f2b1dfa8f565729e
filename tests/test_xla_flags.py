"""eca_flax.cli.xla_flags: the XLA:CPU flags train.py sets, and how they combine with the user's."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from eca_flax.cli import xla_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_add_appends_missing_flags_and_keeps_the_users_values(monkeypatch) -> None:
    ynn = "--xla_cpu_experimental_ynn_fusion_type"
    monkeypatch.setenv("XLA_FLAGS", f"--xla_force_host_platform_device_count=2 {ynn}=")
    flags = xla_flags.add([f"{ynn}=-individual_convolution", "--xla_cpu_ftz=true"])
    assert flags == f"--xla_force_host_platform_device_count=2 {ynn}= --xla_cpu_ftz=true"
    assert os.environ["XLA_FLAGS"] == flags
    assert xla_flags.add("--xla_cpu_ftz=false") == flags  # already named: the user's value stays
    monkeypatch.delenv("XLA_FLAGS")
    assert xla_flags.add(()) == ""
    assert "XLA_FLAGS" not in os.environ


@pytest.mark.parametrize(
    "version, expected",
    [("0.10.2", xla_flags.CPU_FLAGS), ("0.11.2", xla_flags.CPU_FLAGS),
     ("0.12.0.1", xla_flags.CPU_FLAGS), ("0.9.2", ()), ("0.13.0", ()), ("1.0.0", ()),
     ("not-a-version", ())],
)  # fmt: skip
def test_flags_only_for_jaxlib_versions_they_were_measured_on(version, expected) -> None:
    """An unknown flag name aborts XLA at start-up, so unmeasured versions get none."""
    assert xla_flags.recommended(version) == expected


CHECK = """
import sys
import jax, jax.numpy as jnp
from eca_flax.cli import xla_flags
if sys.argv[1] == "recommended":
    xla_flags.use_recommended()
conv = jax.jit(lambda x, w: jax.lax.conv_general_dilated(
    x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")))
dot = jax.jit(lambda a, b: a @ b)
print(int("__ynn_fusion" in conv.lower(jnp.ones((2, 56, 56, 64)), jnp.ones((3, 3, 64, 64)))
          .compile().as_text()),
      int("__ynn_fusion" in dot.lower(jnp.ones((512, 256)), jnp.ones((256, 256)))
          .compile().as_text()))
"""


@pytest.mark.slow
def test_installed_jaxlib_accepts_the_flags_and_runs_convolutions_on_eigen() -> None:
    """In a fresh process: XLA starts with the flags, convolutions leave YNNPACK, dots stay."""
    if not xla_flags.recommended():
        pytest.skip("no flags measured for the installed jaxlib")

    def run(mode: str) -> str:
        env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
        proc = subprocess.run(
            [sys.executable, "-c", CHECK, mode], cwd=REPO, env=env, capture_output=True,
            text=True, timeout=120,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.split()

    assert run("defaults") == ["1", "1"]  # XLA's default: both on YNNPACK
    assert run("recommended") == ["0", "1"]
