#!/usr/bin/env bash
# Build the aws-ofi-rccl plugin, which lets RCCL talk over Frontier's Slingshot network through libfabric
# (without it RCCL falls back to TCP sockets between nodes). Run once on a login node:
#   bash aws_ofi_rccl.sh                       # ROCm 6.3.1, libfabric 1.22.0, the pinned plugin revision
#   ROCM_VERSION=6.4.1 bash aws_ofi_rccl.sh    # other versions: every pin below is an environment override
# Idempotent: a finished build of the same revision, ROCm and libfabric is reused. The train_*.sh scripts look
# for the plugin in AWS_OFI_RCCL_DIR (default .cache/aws-ofi-rccl), where this script installs it.
set -euo pipefail

ROCM_VERSION=${ROCM_VERSION:-6.3.1}
LIBFABRIC_VERSION=${LIBFABRIC_VERSION:-1.22.0}
PLUGIN_REPO=${PLUGIN_REPO:-https://github.com/ROCm/aws-ofi-rccl}
PLUGIN_REV=${PLUGIN_REV:-05999f460d2ce00190f4e47364813bd3586a8f95}
ROCM_PATH=${ROCM_PATH:-/opt/rocm-$ROCM_VERSION}
LIBFABRIC_PATH=${LIBFABRIC_PATH:-/opt/cray/libfabric/$LIBFABRIC_VERSION}
MODULES=${MODULES-"PrgEnv-gnu/8.5.0 rocm/$ROCM_VERSION craype-accel-amd-gfx90a gcc-native/12.3 libtool"}
REPO=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
PREFIX=${AWS_OFI_RCCL_DIR:-$REPO/.cache/aws-ofi-rccl}
SRC=${SRC:-$PREFIX-src}
stamp="aws-ofi-rccl $PLUGIN_REV rocm $ROCM_VERSION libfabric $LIBFABRIC_VERSION"

die() {
  echo "error: $*" >&2
  exit 2
}

if [[ -f $PREFIX/lib/librccl-net.so && $(cat "$PREFIX/BUILD_INFO" 2>/dev/null) == "$stamp" ]]; then
  echo "already built: $stamp"
else
  if [[ -n $MODULES ]]; then
    command -v module >/dev/null 2>&1 || die "no 'module' command: run on Frontier, or set MODULES= to skip"
    # shellcheck disable=SC2086  # a list of module names
    module load $MODULES
  fi
  [[ -d $ROCM_PATH ]] || die "ROCm $ROCM_VERSION not found at $ROCM_PATH; set ROCM_VERSION or ROCM_PATH"
  [[ -d $LIBFABRIC_PATH ]] || die "libfabric $LIBFABRIC_VERSION not found at $LIBFABRIC_PATH; set LIBFABRIC_PATH"
  rm -f "$PREFIX/BUILD_INFO" # written last: a half-finished build is never taken for a good one
  [[ -d $SRC/.git ]] || git clone --quiet "$PLUGIN_REPO" "$SRC"
  git -C "$SRC" cat-file -e "$PLUGIN_REV^{commit}" 2>/dev/null || git -C "$SRC" fetch --quiet origin
  git -C "$SRC" checkout --quiet --detach "$PLUGIN_REV"
  cd "$SRC"
  ./autogen.sh
  export LD_LIBRARY_PATH="$ROCM_PATH/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  CC=hipcc CFLAGS="-I$ROCM_PATH/include" ./configure --prefix="$PREFIX" --with-libfabric="$LIBFABRIC_PATH" \
    --with-rccl="$ROCM_PATH" --with-hip="$ROCM_PATH" --disable-tests
  make -j "${MAKE_JOBS:-16}"
  make install
  [[ -f $PREFIX/lib/librccl-net.so ]] || die "the build did not install $PREFIX/lib/librccl-net.so"
  echo "$stamp" >"$PREFIX/BUILD_INFO"
  echo "built: $stamp"
fi
echo "plugin: $PREFIX/lib/librccl-net.so"
echo "export LD_LIBRARY_PATH=$PREFIX/lib:\$LD_LIBRARY_PATH   # train_*.sh do this from AWS_OFI_RCCL_DIR=$PREFIX"
