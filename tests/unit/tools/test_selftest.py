"""The device self-test (``python -m torchtitan_hyena.tools.selftest``) in its CPU smoke mode: the CLI passes and
writes its JSON, a kernel with a causal off-by-one makes it fail, and bad arguments are one-line errors.

The smoke run is the GPU run's code path at tiny shapes with the Triton kernels interpreted, so the tool cannot rot
between GPU loans; what only a GPU shows (compiled kernels, speed, MFU, memory) is the GPU run's job.
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import run_cli

pytest.importorskip("triton")

from torchtitan_hyena.errors import UserError
from torchtitan_hyena.ops import triton_conv, triton_fftconv
from torchtitan_hyena.tools.selftest.runner import main

KERNELS = [f"triton {op} fwd+bwd {dtype}" for op in ("featurizer", "se", "mr") for dtype in ("float32", "bfloat16")]


@pytest.mark.slow
def test_smoke_cli_passes_and_writes_every_section(tmp_path):
    out = tmp_path / "results" / "selftest.json"
    proc = run_cli(["--smoke", "--output", str(out)], module="torchtitan_hyena.tools.selftest")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "selftest passed" in proc.stdout and "throughput" in proc.stdout  # the tables are printed
    report = json.loads(out.read_text())
    assert report["passed"] and report["failures"] == [] and report["mode"] == "smoke"
    assert report["hostname"] and report["date"] and report["device"]["type"] == "cpu"
    assert {"torch", "triton", "hip", "cuda", "flash_attn"} <= set(report["versions"])
    kernels = {"conv kernels", "LI kernels", "flash-attn", "float8"}
    parts = {*kernels, "conv speed", "LI speed", "dry runs", "compiled steps", "throughput"}
    assert set(report["seconds"]) == parts and "errors" not in report["sections"]
    sections = report["sections"]
    status = {r["check"]: r["status"] for r in sections["correctness"]}
    assert all(status[k] == "pass" for k in KERNELS)
    assert [s for k, s in status.items() if k.startswith("triton LI")] == ["pass"] * 4  # 2 lengths x fp32, bf16
    assert status["flash-attn vs SDPA"] == "skipped"
    assert status["float8 gate (refused)"] == "pass" and status["float8 MLP fwd+bwd vs bf16 (emulated)"] == "pass"
    assert status["hyena debugmodel: 2 steps compiled (eager) vs eager"] == "pass"
    speed = {r["impl"]: r for r in sections["kernel speed"]}
    assert set(speed) == {"triton", "conv1d", "fft"} and speed["triton"]["total_frac_clone"] > 0
    assert speed["triton"]["speedup_conv1d_total"] > 0
    assert {(r["impl"], r["L"]) for r in sections["LI conv"]} == {("triton", 32), ("chunked", 32)}
    rows = sections["throughput"]
    assert [r["model"] for r in rows] == ["llama3 debugmodel", "hyena debugmodel"]
    for r in rows:
        assert r["tokens_per_s"] > 0 and r["dry_run_peak_gib"] > 0 and r["mfu_pct"] is None  # no CPU peak FLOP/s


@pytest.mark.skipif(torch.cuda.is_available() or not triton_conv.INTERPRETED, reason="the smoke mode runs on CPU")
def test_broken_kernel_fails_the_run(tmp_path, monkeypatch):
    """A direct-conv kernel whose output is one step late (the classic causal off-by-one) fails the featurizer and SE
    checks in both dtypes while MR still passes; a check that raises is a failed row and the later checks still run;
    the JSON is written, naming the failures."""
    real = triton_conv.direct_forward

    def late(*args, **kwargs):
        y = real(*args, **kwargs)
        return torch.cat([torch.zeros_like(y[:, :1]), y[:, :-1]], dim=1)

    def crash(*args, **kwargs):
        raise RuntimeError("LI kernel crashed")

    monkeypatch.setattr(triton_conv, "direct_forward", late)
    monkeypatch.setattr(triton_fftconv, "compare_with_reference", crash)
    out = tmp_path / "broken.json"
    with pytest.raises(SystemExit) as exc:
        main(["--smoke", "--sections", "kernels", "--output", str(out)])
    assert exc.value.code == 1
    report = json.loads(out.read_text())
    assert not report["passed"]
    broken = [f"correctness: {k}" for k in KERNELS if not k.startswith("triton mr")]
    assert report["failures"] == [*broken, "errors: LI kernels"]
    assert report["sections"]["errors"][0]["detail"] == "RuntimeError: LI kernel crashed"
    assert any(r["check"].startswith("float8") for r in report["sections"]["correctness"])


def test_bad_arguments_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="--sections got bogus; choose from kernels, training"):
        main(["--smoke", "--sections", "kernels,bogus"])
    if torch.cuda.is_available() or not triton_conv.INTERPRETED:
        return
    with pytest.raises(UserError, match="no GPU is visible.*--smoke"):
        main(["--sections", "kernels"])
    (tmp_path / "folder").mkdir()
    with pytest.raises(UserError, match="is a folder"):
        main(["--smoke", "--sections", "kernels", "--output", str(tmp_path / "folder")])
