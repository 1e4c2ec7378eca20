#!/usr/bin/env bash
# RCCL's libfabric network plugin for Frontier's Slingshot network (without it RCCL falls back to TCP sockets
# between nodes: jobs run, at a fraction of the speed). Run once on a login node; three ways, chosen by PLUGIN:
#   bash aws_ofi_rccl.sh                                  # ROCm 6.3.1: builds ROCm's aws-ofi-rccl fork (PLUGIN=rccl)
#   ROCM_VERSION=7.1.1 bash aws_ofi_rccl.sh               # ROCm >= 7: builds upstream aws-ofi-nccl (PLUGIN=upstream)
#   PLUGIN=module ROCM_VERSION=7.1.1 bash aws_ofi_rccl.sh # no build: checks the site's rccl-net-plugin module
# PLUGIN defaults to rccl below ROCm 7 and upstream from ROCm 7. Every pin is an environment override: ROCM_VERSION,
# ROCM_PATH, LIBFABRIC_VERSION, LIBFABRIC_PATH, MODULES; PLUGIN_REPO and PLUGIN_REV (rccl); PLUGIN_VERSION,
# PLUGIN_URL, PLUGIN_SHA256 (checked when set) and HWLOC_PATH (upstream). A finished build of the same plugin,
# source, ROCm and libfabric is reused. Builds install into AWS_OFI_RCCL_DIR (default .cache/aws-ofi-rccl), where the
# job scripts look, from sources in SRC (default AWS_OFI_RCCL_DIR-PLUGIN-src). With PLUGIN=module, run the job
# scripts with PLUGIN=module too.
#
# What was verified, and how: each pinned revision's source was read at that commit (git show REV:FILE on a clone of
# the public repository); nothing was compiled here (no ROCm or Slingshot on the machine that wrote this script).
# * rccl: ROCm/aws-ofi-rccl 17d41cbf (2024-03-01, head of its cxi branch; the fork is deprecated since late 2025).
#   src/nccl_ofi_net.c reads hipPointerAttribute_t's memory type as .memoryType before HIP 6 and .type from HIP 6
#   (MEMORY_TYPE_ATTRIBUTE, commit dc44b48); configure.ac defines __HIP_PLATFORM_AMD__ and takes --with-libfabric,
#   --with-hip, --with-rccl and --disable-tests; src/Makefile.am installs lib/librccl-net.so. Every FI_*/fi_* name
#   in its source exists in libfabric 2.3.1's headers (Frontier dropped libfabric 1.22 in May 2026). The former pin
#   05999f4 (2022) read .memoryType unconditionally, defined __HIP_PLATFORM_HCC__ and had no --disable-tests, so it
#   cannot compile against ROCm 6; the build below refuses any revision that reads .memoryType without the guard.
# * upstream: aws/aws-ofi-nccl v1.19.2 (tag at 17120adb, 2026-05-13), from its release tarball as OLCF's PyTorch
#   guide builds it against libfabric 2.3.1 and ROCm 7.1.1 (a tarball needs no autotools; the v1.19.2 release notes
#   fix "RCCL build when building from release tarballs"). configure.ac/m4 take --with-rocm (needed: without it no
#   ROCm build is detected; probes libamdhip64 and hip/hip_runtime_api.h), --with-libfabric (>= 1.11; its release
#   notes: tested with libfabric 2.4.0), --with-hwloc (hwloc is required, found on the default paths otherwise) and
#   --disable-tests. src/nccl_ofi_rocm.cpp reads the memory type with hipPointerGetAttribute(
#   HIP_POINTER_ATTRIBUTE_MEMORY_TYPE), no struct field. For ROCm, src/Makefile.am installs lib/librccl-net.so and
#   lib/librccl-net-ofi.so.
# * module: OLCF's PyTorch guide (olcf/olcf-user-docs software/analytics/pytorch_frontier.rst, 2026-07): load
#   rccl-net-plugin after rocm; it points RCCL at the plugin and sets the Slingshot variables.
set -euo pipefail

die() {
  echo "error: $*" >&2
  exit 2
}

ROCM_VERSION=${ROCM_VERSION:-6.3.1}
rocm_major=${ROCM_VERSION%%.*}
[[ $rocm_major =~ ^[0-9]+$ ]] || die "ROCM_VERSION=$ROCM_VERSION is not a version like 6.3.1"
if ((rocm_major >= 7)); then PLUGIN=${PLUGIN:-upstream}; else PLUGIN=${PLUGIN:-rccl}; fi
ROCM_PATH=${ROCM_PATH:-/opt/rocm-$ROCM_VERSION}
REPO=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
PREFIX=${AWS_OFI_RCCL_DIR:-$REPO/.cache/aws-ofi-rccl}
LIBFABRIC_VERSION=${LIBFABRIC_VERSION:-2.3.1}

case $PLUGIN in
  rccl)
    PLUGIN_REPO=${PLUGIN_REPO:-https://github.com/ROCm/aws-ofi-rccl}
    PLUGIN_REV=${PLUGIN_REV:-17d41cbf5618536c4b1076d29748416ab307040f}
    source_pin="$PLUGIN_REPO $PLUGIN_REV"
    MODULES=${MODULES-"PrgEnv-gnu/8.5.0 rocm/$ROCM_VERSION craype-accel-amd-gfx90a libtool"}
    ;;
  upstream)
    PLUGIN_VERSION=${PLUGIN_VERSION:-1.19.2}
    PLUGIN_URL=${PLUGIN_URL:-https://github.com/aws/aws-ofi-nccl/releases/download/v$PLUGIN_VERSION/aws-ofi-nccl-$PLUGIN_VERSION.tar.gz}
    source_pin=$PLUGIN_URL
    MODULES=${MODULES-"PrgEnv-gnu/8.7.0 rocm/$ROCM_VERSION craype-accel-amd-gfx90a gcc-native/14.2"}
    ;;
  module)
    MODULES=${MODULES-"rocm/$ROCM_VERSION rccl-net-plugin"}
    ;;
  *) die "PLUGIN=$PLUGIN is not one of rccl (ROCm 6), upstream (ROCm >= 7) or module" ;;
esac

load_modules() {
  [[ -n $MODULES ]] || return 0
  command -v module >/dev/null 2>&1 || die "no 'module' command: run on Frontier, or set MODULES= to skip"
  # shellcheck disable=SC2086  # a list of module names
  module load $MODULES
}

# The plugin RCCL will load: NCCL_NET_PLUGIN when set, else the first librccl-net.so on LD_LIBRARY_PATH.
visible_plugin() {
  if [[ -n ${NCCL_NET_PLUGIN:-} && -f $NCCL_NET_PLUGIN ]]; then
    echo "$NCCL_NET_PLUGIN"
    return 0
  fi
  local dir
  local -a dirs
  IFS=: read -ra dirs <<<"${LD_LIBRARY_PATH:-}"
  for dir in ${dirs[@]+"${dirs[@]}"}; do
    [[ -f $dir/librccl-net.so ]] && echo "$dir/librccl-net.so" && return 0
  done
  return 1
}

if [[ $PLUGIN == module ]]; then
  load_modules
  found=$(visible_plugin) ||
    die "after 'module load $MODULES' neither NCCL_NET_PLUGIN nor LD_LIBRARY_PATH leads to librccl-net.so; check 'module show rccl-net-plugin' or build one (PLUGIN=rccl or upstream)"
  echo "site module: $found"
  echo "run the job scripts with PLUGIN=module (they load rccl-net-plugin instead of using $PREFIX)"
  exit 0
fi

LIBFABRIC_PATH=${LIBFABRIC_PATH:-/opt/cray/libfabric/$LIBFABRIC_VERSION}
SRC=${SRC:-$PREFIX-$PLUGIN-src}
stamp="$PLUGIN $source_pin rocm $ROCM_VERSION libfabric $LIBFABRIC_VERSION"

# ROCm's fork at PLUGIN_REV, from git (needs autotools: autogen.sh).
fetch_fork() {
  [[ -d $SRC/.git ]] || git clone --quiet "$PLUGIN_REPO" "$SRC"
  local origin
  origin=$(git -C "$SRC" remote get-url origin)
  [[ $origin == "$PLUGIN_REPO" ]] || die "$SRC is a clone of $origin, not PLUGIN_REPO=$PLUGIN_REPO; remove it or set SRC"
  git -C "$SRC" cat-file -e "$PLUGIN_REV^{commit}" 2>/dev/null || git -C "$SRC" fetch --quiet origin
  git -C "$SRC" checkout --quiet --detach "$PLUGIN_REV"
  cd "$SRC"
  if ((rocm_major >= 6)) && grep -q 'memoryType' src/nccl_ofi_net.c && ! grep -q 'HIP_VERSION_MAJOR' src/nccl_ofi_net.c; then
    die "PLUGIN_REV=$PLUGIN_REV reads hipPointerAttribute_t.memoryType, which ROCm 6 renamed to .type: it cannot compile against ROCm $ROCM_VERSION; unset PLUGIN_REV (or use PLUGIN=upstream)"
  fi
  ./autogen.sh
}

# Upstream's release tarball (configure is generated: no autotools), checked against PLUGIN_SHA256 when set.
fetch_release() {
  local tarball=$SRC/${PLUGIN_URL##*/}
  mkdir -p "$SRC"
  if [[ ! -f $tarball ]]; then
    curl -fsSL -o "$tarball.part" "$PLUGIN_URL" || die "could not download $PLUGIN_URL; set PLUGIN_URL or PLUGIN_VERSION"
    mv "$tarball.part" "$tarball"
  fi
  if [[ -n ${PLUGIN_SHA256:-} ]]; then
    echo "$PLUGIN_SHA256  $tarball" | sha256sum --check --status ||
      die "$tarball does not match PLUGIN_SHA256=$PLUGIN_SHA256; remove it to download again"
  fi
  local top
  top=$(tar -tzf "$tarball" | sed -n 1p)
  top=${top%%/*}
  rm -rf "${SRC:?}/$top"
  tar -xzf "$tarball" -C "$SRC"
  cd "$SRC/$top"
  echo "source: $tarball (sha256 $(sha256sum "$tarball" | cut -d' ' -f1))"
}

if [[ -f $PREFIX/lib/librccl-net.so && $(cat "$PREFIX/BUILD_INFO" 2>/dev/null) == "$stamp" ]]; then
  echo "already built: $stamp"
else
  load_modules
  [[ -d $ROCM_PATH ]] || die "ROCm $ROCM_VERSION not found at $ROCM_PATH; set ROCM_VERSION or ROCM_PATH"
  if [[ -f $ROCM_PATH/.info/version ]]; then
    found_version=$(<"$ROCM_PATH/.info/version")
    [[ $found_version == "$ROCM_VERSION"* ]] ||
      die "$ROCM_PATH holds ROCm $found_version, not ROCM_VERSION=$ROCM_VERSION; set them to agree"
  fi
  [[ -d $LIBFABRIC_PATH ]] || die "libfabric $LIBFABRIC_VERSION not found at $LIBFABRIC_PATH; set LIBFABRIC_PATH"
  rm -f "$PREFIX/BUILD_INFO" # written last: a half-finished build is never taken for a good one
  export LD_LIBRARY_PATH="$ROCM_PATH/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  if [[ $PLUGIN == rccl ]]; then
    fetch_fork
    CC=hipcc CFLAGS="-I$ROCM_PATH/include" ./configure --prefix="$PREFIX" --with-libfabric="$LIBFABRIC_PATH" \
      --with-hip="$ROCM_PATH" --with-rccl="$ROCM_PATH" --disable-tests
  else
    fetch_release
    hwloc=()
    [[ -z ${HWLOC_PATH:-} ]] || hwloc=(--with-hwloc="$HWLOC_PATH")
    CC=gcc CXX=g++ ./configure --prefix="$PREFIX" --with-libfabric="$LIBFABRIC_PATH" --with-rocm="$ROCM_PATH" \
      ${hwloc[@]+"${hwloc[@]}"} --disable-tests
  fi
  make -j "${MAKE_JOBS:-16}"
  make install
  [[ -f $PREFIX/lib/librccl-net.so ]] || die "the build did not install $PREFIX/lib/librccl-net.so"
  # Some RCCL versions look for the plugin under NCCL's name (OLCF's recipe adds this link).
  [[ $PLUGIN == rccl ]] || ln -sfn librccl-net.so "$PREFIX/lib/libnccl-net.so"
  echo "$stamp" >"$PREFIX/BUILD_INFO"
  echo "built: $stamp"
fi
echo "plugin: $PREFIX/lib/librccl-net.so"
echo "export NCCL_NET_PLUGIN=$PREFIX/lib/librccl-net.so   # train_*.sh do this from AWS_OFI_RCCL_DIR=$PREFIX"
