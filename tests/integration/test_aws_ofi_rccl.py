"""aws_ofi_rccl.sh: each plugin path (ROCm 6 fork, upstream for ROCm >= 7, site module) against a fake ROCm tree,
with git/configure/make stubbed on PATH; checks the exact configure arguments each path would run."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO, env

SCRIPT = REPO / "aws_ofi_rccl.sh"
FORK_PIN = "17d41cbf5618536c4b1076d29748416ab307040f"  # ROCm/aws-ofi-rccl, cxi branch head
UPSTREAM_URL = "https://github.com/aws/aws-ofi-nccl/releases/download/v1.19.2/aws-ofi-nccl-1.19.2.tar.gz"

# The memory-type read of each source generation (src/nccl_ofi_net.c), as the real revisions have it.
GUARDED_SOURCE = "#if (HIP_VERSION_MAJOR < 6)\n#  define MEMORY_TYPE_ATTRIBUTE(x) (x).memoryType\n#else\n#endif\n"
OLD_SOURCE = "if (attr.memoryType == hipMemoryTypeDevice) {\n"

STUBS = {
    # clone: a source tree whose configure records its environment and arguments
    "git": r"""echo "$@" >> "$STUB_LOG/git"
if [[ $1 == clone ]]; then
  mkdir -p "$4/.git" "$4/src"
  echo "$3" > "$4/.git/origin"
  printf '%s' "${STUB_NET_C:-}" > "$4/src/nccl_ofi_net.c"
  printf '#!/usr/bin/env bash\n' > "$4/autogen.sh"
  printf '#!/usr/bin/env bash\necho "CC=$CC CXX=${CXX:-} CFLAGS=${CFLAGS:-}" > "$STUB_LOG/configure.env"\n' \
    > "$4/configure"
  printf 'printf "%%s\\n" "$@" > "$STUB_LOG/configure"\n' >> "$4/configure"
  chmod +x "$4/autogen.sh" "$4/configure"
elif [[ $3 == remote ]]; then
  cat "$2/.git/origin"
elif [[ $3 == cat-file ]]; then
  exit 1
fi""",
    # download: a release tarball of a source tree with the recording configure
    "curl": r"""echo "$@" >> "$STUB_LOG/curl"
out=$3; url=$4
tree=$(mktemp -d) && top=$(basename "$url" .tar.gz) && mkdir -p "$tree/$top"
printf '#!/usr/bin/env bash\necho "CC=$CC CXX=${CXX:-} CFLAGS=${CFLAGS:-}" > "$STUB_LOG/configure.env"\n' \
  > "$tree/$top/configure"
printf 'printf "%%s\\n" "$@" > "$STUB_LOG/configure"\n' >> "$tree/$top/configure"
chmod +x "$tree/$top/configure"
tar -czf "$out" -C "$tree" "$top" && rm -rf "$tree"
""",
    "make": r"""echo "$@" >> "$STUB_LOG/make"
if [[ $1 == install ]]; then
  prefix=$(sed -n 's/^--prefix=//p' "$STUB_LOG/configure")
  mkdir -p "$prefix/lib" && touch "$prefix/lib/librccl-net.so"
fi""",
    "module": 'echo "$@" >> "$STUB_LOG/module"',
}


@pytest.fixture
def build(tmp_path):
    """Runs the script with stubs on PATH, a fake ROCm tree (with its .info/version) and a fake libfabric."""
    bin_dir, log = tmp_path / "bin", tmp_path / "log"
    bin_dir.mkdir()
    log.mkdir()
    for name, body in STUBS.items():
        (bin_dir / name).write_text(f"#!/usr/bin/env bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    fabric = tmp_path / "libfabric"
    fabric.mkdir()

    class Build:
        def __init__(self) -> None:
            self.tmp, self.log, self.prefix, self.fabric = tmp_path, log, tmp_path / "ofi", fabric

        def rocm(self, version: str) -> Path:
            path = tmp_path / f"rocm-{version}"
            (path / ".info").mkdir(parents=True, exist_ok=True)
            (path / ".info" / "version").write_text(f"{version}-123\n")
            return path

        def run(self, rocm_version: str | None = None, **extra: str) -> subprocess.CompletedProcess:
            e = {k: v for k, v in env().items() if k not in ("NCCL_NET_PLUGIN", "LD_LIBRARY_PATH", "PLUGIN")}
            e.update(PATH=f"{bin_dir}{os.pathsep}{e['PATH']}", STUB_LOG=str(log), AWS_OFI_RCCL_DIR=str(self.prefix),
                     LIBFABRIC_PATH=str(fabric), STUB_NET_C=GUARDED_SOURCE)  # fmt: skip
            if rocm_version is not None:
                e.update(ROCM_VERSION=rocm_version, ROCM_PATH=str(self.rocm(rocm_version)))
            e.update(extra)
            return subprocess.run(["bash", str(SCRIPT)], cwd=tmp_path, env=e, capture_output=True, text=True,
                                  timeout=60)  # fmt: skip

        def read(self, name: str) -> str:
            path = log / name
            return path.read_text() if path.exists() else ""

        def reset(self) -> None:
            for path in log.iterdir():
                path.unlink()

    return Build()


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


def test_pins_are_the_verified_revisions():
    text = SCRIPT.read_text()
    assert "05999f460d2ce00190f4e47364813bd3586a8f95" not in text
    assert re.findall(r"PLUGIN_REV=\$\{PLUGIN_REV:-([0-9a-f]{40})\}", text) == [FORK_PIN]
    assert (
        "PLUGIN_VERSION=${PLUGIN_VERSION:-1.19.2}" in text and "LIBFABRIC_VERSION=${LIBFABRIC_VERSION:-2.3.1}" in text
    )


def test_rocm6_builds_the_fork_and_reuses_the_build(build):
    rocm = build.rocm("6.3.1")
    proc = build.run(ROCM_PATH=str(rocm))  # ROCM_VERSION defaults to 6.3.1
    assert proc.returncode == 0, proc.stderr
    git = build.read("git")
    assert (
        "clone --quiet https://github.com/ROCm/aws-ofi-rccl" in git and f"checkout --quiet --detach {FORK_PIN}" in git
    )
    assert build.read("configure").splitlines() == [
        f"--prefix={build.prefix}", f"--with-libfabric={build.fabric}", f"--with-hip={rocm}", f"--with-rccl={rocm}",
        "--disable-tests",
    ]  # fmt: skip
    assert build.read("configure.env").split() == ["CC=hipcc", "CXX=", f"CFLAGS=-I{rocm}/include"]
    assert "rocm/6.3.1" in build.read("module")
    stamp = f"rccl https://github.com/ROCm/aws-ofi-rccl {FORK_PIN} rocm 6.3.1 libfabric 2.3.1"
    assert (build.prefix / "BUILD_INFO").read_text().strip() == stamp
    assert f"export NCCL_NET_PLUGIN={build.prefix}/lib/librccl-net.so" in proc.stdout

    build.reset()
    again = build.run(ROCM_PATH=str(rocm))
    assert again.returncode == 0 and "already built" in again.stdout and build.read("git") == ""
    other = build.run("6.4.1")  # another ROCm rebuilds
    assert other.returncode == 0 and "rocm 6.4.1" in (build.prefix / "BUILD_INFO").read_text(), other.stderr


def test_rocm7_builds_upstream_from_its_release_against_libfabric_2(build):
    proc = build.run("7.1.1", HWLOC_PATH="/opt/hwloc")
    assert proc.returncode == 0, proc.stderr
    rocm = build.tmp / "rocm-7.1.1"
    tarball = build.tmp / "ofi-upstream-src" / "aws-ofi-nccl-1.19.2.tar.gz"
    assert build.read("curl").split() == ["-fsSL", "-o", f"{tarball}.part", UPSTREAM_URL] and build.read("git") == ""
    assert build.read("configure").splitlines() == [
        f"--prefix={build.prefix}", f"--with-libfabric={build.fabric}", f"--with-rocm={rocm}",
        "--with-hwloc=/opt/hwloc", "--disable-tests",
    ]  # fmt: skip
    assert build.read("configure.env").split() == ["CC=gcc", "CXX=g++", "CFLAGS="]
    assert {"rocm/7.1.1", "gcc-native/14.2"} <= set(build.read("module").split())
    assert (build.prefix / "BUILD_INFO").read_text().split() == ["upstream", UPSTREAM_URL, "rocm", "7.1.1",
                                                                 "libfabric", "2.3.1"]  # fmt: skip
    assert os.readlink(build.prefix / "lib" / "libnccl-net.so") == "librccl-net.so"
    digest = hashlib.sha256(tarball.read_bytes()).hexdigest()
    assert f"sha256 {digest}" in proc.stdout  # printed, to pin with PLUGIN_SHA256

    build.reset()
    (build.prefix / "BUILD_INFO").unlink()  # rebuild from the downloaded tarball, checked against a pinned digest
    proc = build.run("7.1.1", PLUGIN_SHA256=digest)
    assert proc.returncode == 0 and build.read("curl") == "", proc.stderr
    build.reset()
    error = one_line_error(build.run("7.2.0", PLUGIN_SHA256="0" * 64))
    assert "does not match PLUGIN_SHA256" in error and build.read("configure") == ""


def test_module_path_builds_nothing(build):
    plugin = build.tmp / "site" / "librccl-net.so"
    plugin.parent.mkdir()
    plugin.touch()
    # an exported shell function, as Lmod's module is: it can set variables in the script's shell
    module = (f'() {{ echo "$@" >> "$STUB_LOG/module"; [[ " $* " != *" rccl-net-plugin "* ]] || '
              f'export NCCL_NET_PLUGIN={plugin}; }}')  # fmt: skip
    proc = build.run("7.1.1", PLUGIN="module", **{"BASH_FUNC_module%%": module})
    assert proc.returncode == 0, proc.stderr
    assert f"site module: {plugin}" in proc.stdout and "PLUGIN=module" in proc.stdout
    assert build.read("module").split() == ["load", "rocm/7.1.1", "rccl-net-plugin"]
    assert build.read("git") == "" and not build.prefix.exists()
    # a module that does not provide the plugin (here: the stub on PATH sets nothing)
    error = one_line_error(build.run("7.1.1", PLUGIN="module"))
    assert "rccl-net-plugin" in error and "librccl-net.so" in error


def test_refusals_are_one_line(build):
    error = one_line_error(build.run("6.3.1", PLUGIN_REV="05999f460d2ce00190f4e47364813bd3586a8f95",
                                     STUB_NET_C=OLD_SOURCE))  # fmt: skip
    assert "memoryType" in error and "ROCm 6 renamed to .type" in error
    assert not (build.prefix / "BUILD_INFO").exists() and build.read("configure") == ""

    rocm = build.rocm("6.2.4")
    error = one_line_error(build.run(ROCM_VERSION="6.3.1", ROCM_PATH=str(rocm)))
    assert "holds ROCm 6.2.4-123, not ROCM_VERSION=6.3.1" in error
    error = one_line_error(build.run(ROCM_VERSION="6.3.1", ROCM_PATH=str(build.tmp / "nope")))
    assert "ROCm 6.3.1 not found" in error
    assert "not one of rccl" in one_line_error(build.run("6.3.1", PLUGIN="nccl"))
    assert "not a version" in one_line_error(build.run(ROCM_VERSION="latest"))
