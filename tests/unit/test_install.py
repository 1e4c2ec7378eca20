"""Installing on a GPU cluster keeps the cluster's torch and the Triton it came with; a mismatched pair fails in one
line when the kernels are imported."""

from __future__ import annotations

import subprocess
import sys
from importlib import metadata

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from tests.conftest import REPO, env

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROCM_TORCH = Version("2.11.0+rocm6.3")  # the GPU image's torch version, as a ROCm wheel names it
TRITONS = {"triton", "pytorch-triton-rocm"}


def declared() -> list[Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return [Requirement(r) for r in project["dependencies"]]


def test_declared_dependencies_cannot_pull_triton_over_a_rocm_torch():
    """Walk the declared dependencies' requirement closure (as installed here, markers evaluated, no extras).

    On a machine whose ROCm torch came with pytorch-triton-rocm, pip installs PyPI's triton over it if anything in
    the closure requires triton, or requires a torch the ROCm wheel does not satisfy (pip would then replace torch
    with PyPI's, which pins triton)."""
    names = {canonicalize_name(r.name) for r in declared()}
    assert not names & (TRITONS | {"torch"}), names
    seen: set[str] = set()
    todo = declared()
    while todo:
        req = todo.pop()
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        name = canonicalize_name(req.name)
        assert name not in TRITONS, f"{req} is in the dependency closure"
        if name == "torch":
            assert req.specifier.contains(ROCM_TORCH, prereleases=True), f"{req} would replace a ROCm torch"
            continue
        if name in seen:
            continue
        seen.add(name)
        todo.extend(Requirement(r) for r in metadata.requires(req.name) or [])
    assert {"datasets", "torchao", "torchdata"} <= seen  # the walk reached the packages


@pytest.fixture
def fake_stack(monkeypatch):
    """Pretend to be a given torch build with given distributions installed."""
    tb = pytest.importorskip("torchtitan_hyena.ops.triton_backend")

    def install(hip: str | None, cuda: str | None, version: str, dists: dict[str, str], torch_requires: list[str]):
        import torch

        monkeypatch.setattr(torch.version, "hip", hip)
        monkeypatch.setattr(torch.version, "cuda", cuda)
        monkeypatch.setattr(torch, "__version__", version)

        def fake_version(name: str) -> str:
            if name not in dists:
                raise metadata.PackageNotFoundError(name)
            return dists[name]

        monkeypatch.setattr(tb.metadata, "version", fake_version)
        monkeypatch.setattr(tb.metadata, "requires", lambda name: torch_requires if name == "torch" else [])
        return tb

    return install


def test_mismatch_names_both_versions_and_the_fix(fake_stack):
    pins = ['pytorch-triton-rocm==3.6.0+rocm6.3; platform_system == "Linux"', "filelock"]
    tb = fake_stack("6.3.42131", None, "2.11.0+rocm6.3", {"triton": "3.9.0", "pytorch-triton-rocm": "3.6.0"}, pins)
    message = tb.triton_mismatch()
    assert "torch 2.11.0+rocm6.3 is a ROCm build" in message
    assert "installed Triton is triton 3.9.0 (installed over pytorch-triton-rocm 3.6.0)" in message
    assert (
        "pip uninstall -y triton && pip install --force-reinstall --no-deps 'pytorch-triton-rocm==3.6.0+rocm6.3' "
        "--index-url https://download.pytorch.org/whl/rocm6.3" in message
    )
    with pytest.raises(tb.UserError, match="ROCm build"):
        tb.require_matching_triton()

    tb = fake_stack(
        None, "12.8", "2.11.0+cu128", {"triton": "3.6.0", "pytorch-triton-rocm": "3.6.0"}, ["triton==3.6.0"]
    )
    message = tb.triton_mismatch()
    assert "is a CUDA build (12.8) but the installed Triton is pytorch-triton-rocm 3.6.0" in message
    assert message.endswith(
        "pip uninstall -y pytorch-triton-rocm && pip install --force-reinstall --no-deps 'triton==3.6.0'"
    )


def test_matching_or_cpu_builds_pass(fake_stack):
    assert (
        fake_stack("6.3.42131", None, "2.11.0+rocm6.3", {"pytorch-triton-rocm": "3.6.0"}, []).triton_mismatch() is None
    )
    assert fake_stack(None, "12.8", "2.11.0", {"triton": "3.6.0"}, []).triton_mismatch() is None
    assert fake_stack(None, None, "2.13.0+cpu", {"triton": "3.9.0"}, []).triton_mismatch() is None


def test_a_rocm_torch_with_pypi_triton_fails_at_kernel_import(tmp_path):
    """The real import path, with this machine's PyPI triton and a pytorch-triton-rocm beside it."""
    pytest.importorskip("triton")
    info = tmp_path / "pytorch_triton_rocm-3.6.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: pytorch-triton-rocm\nVersion: 3.6.0\n")
    code = (
        "import torch; torch.version.hip = '6.3.42131'; torch.version.cuda = None\n"
        "from torchtitan_hyena.errors import run_cli\n"
        "run_cli(lambda: __import__('torchtitan_hyena.ops.triton_conv'))\n"
    )
    e = env()
    e["PYTHONPATH"] = f"{tmp_path}:{e['PYTHONPATH']}"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=e, capture_output=True, text=True, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert f"triton {metadata.version('triton')} (installed over pytorch-triton-rocm 3.6.0)" in lines[0]
    assert "pip uninstall -y triton" in lines[0]
