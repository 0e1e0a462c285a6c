#!/usr/bin/env bash
# The system packages memlayer's tests need, installed only where missing
# (scripts/test.sh runs this first; it is safe to run again):
#   - a Vulkan driver that runs on the CPU (lavapipe), for the GPU kernels' tests;
#   - DejaVu Sans, the font of the PNG plots (plotters draws text with ab_glyph);
#   - Chromium (headless, WebGPU on SwiftShader) for the browser test;
#   - Node.js and npm for the browser test's driver (playwright-core);
#   - Debian's aarch64 cross gcc and libc, and qemu-user, for the aarch64
#     tests run under emulation (scripts/test-aarch64.sh);
#   - Xvfb (with xvfb-run and xauth) for the desktop app's window tests;
#   - g++ (C++20) for the CUDA kernels' CPU emulation test
#     (crates/memlayer-cuda/tests/emulated.rs).
# Each piece is checked on its own and only the missing ones are asked of apt.
# A machine may ship Node.js from another apt source (NodeSource's `nodejs`
# bundles npm and conflicts with Debian's `npm`): when `node` and `npm` are
# there, neither package is touched. After installing, every tool is checked
# again and a missing one is named, with what to do about it.
#
# MEMLAYER_DEPS_DRY_RUN=1 prints the apt command instead of running it.
set -euo pipefail

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

have_lavapipe() { compgen -G '/usr/share/vulkan/icd.d/lvp_icd*.json' >/dev/null; }
have_vulkan_loader() { compgen -G '/usr/lib/*/libvulkan.so.1' >/dev/null || [ -e /usr/lib/libvulkan.so.1 ]; }
have_font() { [ -f /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ]; }
have_chromium() { [ -x /usr/bin/chromium ]; }
have_node() { command -v node >/dev/null 2>&1; }
have_npm() { command -v npm >/dev/null 2>&1; }
have_aarch64_gcc() { command -v aarch64-linux-gnu-gcc >/dev/null 2>&1; }
have_aarch64_libc_dev() { [ -e /usr/aarch64-linux-gnu/include/stdio.h ] && [ -e /usr/aarch64-linux-gnu/lib/libc.so ]; }
have_qemu_aarch64() { command -v qemu-aarch64 >/dev/null 2>&1; }
have_xvfb() { command -v xvfb-run >/dev/null 2>&1 && command -v Xvfb >/dev/null 2>&1; }
have_xauth() { command -v xauth >/dev/null 2>&1; }
have_gxx() { command -v g++ >/dev/null 2>&1; }

missing=()
have_lavapipe || missing+=(mesa-vulkan-drivers)
have_vulkan_loader || missing+=(libvulkan1)
have_font || missing+=(fonts-dejavu-core)
have_chromium || missing+=(chromium)
have_aarch64_gcc || missing+=(gcc-aarch64-linux-gnu)
have_aarch64_libc_dev || missing+=(libc6-dev-arm64-cross)
have_qemu_aarch64 || missing+=(qemu-user)
have_xvfb || missing+=(xvfb)
have_xauth || missing+=(xauth)
have_gxx || missing+=(g++)
if ! have_node; then
  # No Node.js at all: Debian's, with its npm.
  missing+=(nodejs)
  have_npm || missing+=(npm)
elif ! have_npm; then
  # A Node.js without npm. Debian's npm only goes with Debian's nodejs: asking
  # for it next to another source's nodejs breaks apt ("held broken packages").
  if dpkg-query -W -f='${Version}' nodejs 2>/dev/null | grep -q 'deb12\|dfsg'; then
    missing+=(npm)
  else
    echo "error: node $(node --version) is installed but npm is not, and this nodejs" >&2
    echo "  ($(dpkg-query -W -f='${Version}' nodejs 2>/dev/null || echo 'not from a Debian package'))" >&2
    echo "  is not Debian's, so Debian's npm cannot be installed beside it." >&2
    echo "  Install the npm that belongs to this Node.js (e.g. its vendor's package), then rerun." >&2
    exit 1
  fi
fi

if [ ${#missing[@]} -gt 0 ]; then
  echo "installing: ${missing[*]}"
  if [ "${MEMLAYER_DEPS_DRY_RUN:-0}" = 1 ]; then
    echo "dry run: apt-get install -y --no-install-recommends ${missing[*]}"
    exit 0
  fi
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
else
  echo "system packages: all present"
fi

# Whatever happened above, name what is still missing.
fail=0
need() {
  local what=$1 check=$2 fix=$3
  if ! $check; then
    echo "error: $what is missing after the install step ($fix)" >&2
    fail=1
  fi
}
need "the lavapipe Vulkan driver (/usr/share/vulkan/icd.d/lvp_icd*.json)" have_lavapipe "apt-get install mesa-vulkan-drivers"
need "the Vulkan loader (libvulkan.so.1)" have_vulkan_loader "apt-get install libvulkan1"
need "DejaVu Sans (/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf)" have_font "apt-get install fonts-dejavu-core"
need "Chromium (/usr/bin/chromium)" have_chromium "apt-get install chromium"
need "node" have_node "apt-get install nodejs, or Node.js 18+ from its vendor"
need "npm" have_npm "the npm of the installed Node.js"
need "the aarch64 cross gcc (aarch64-linux-gnu-gcc)" have_aarch64_gcc "apt-get install gcc-aarch64-linux-gnu"
need "the aarch64 libc headers and libraries (/usr/aarch64-linux-gnu)" have_aarch64_libc_dev "apt-get install libc6-dev-arm64-cross"
need "qemu-aarch64 (user-mode emulation)" have_qemu_aarch64 "apt-get install qemu-user"
need "Xvfb and xvfb-run" have_xvfb "apt-get install xvfb"
need "xauth (xvfb-run needs it)" have_xauth "apt-get install xauth"
need "g++ (the CUDA kernels' CPU emulation test)" have_gxx "apt-get install g++"
[ "$fail" = 0 ] || exit 1
echo "node $(node --version), npm $(npm --version), $(/usr/bin/chromium --version 2>/dev/null || echo chromium)"
