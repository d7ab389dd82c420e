#!/usr/bin/env bash
# What both README commands need before cargo runs: a C compiler, python3 with pip and npm (for
# `loupe fetch`), installed through apt when missing; and cargo itself. Sourced by demo.sh and test.sh.
need=()
command -v cc >/dev/null || need+=(build-essential)
command -v python3 >/dev/null || need+=(python3)
python3 -m pip --version >/dev/null 2>&1 || need+=(python3-pip)
command -v npm >/dev/null || need+=(npm)
# The desktop app: Mesa's CPU Vulkan driver (lavapipe) renders the GUI tests' snapshots and the
# app under Xvfb; X11 client libraries for the window; Xvfb, xwd and netpbm for screenshots.
ls /usr/share/vulkan/icd.d/lvp_icd.*.json >/dev/null 2>&1 || need+=(mesa-vulkan-drivers libvulkan1)
for pkg in libxkbcommon-x11-0 libxcursor1 libxi6 libxrandr2 libx11-xcb1; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
command -v Xvfb >/dev/null || need+=(xvfb)
command -v xwd >/dev/null || need+=(x11-apps)
command -v pnmtopng >/dev/null || need+=(netpbm)
if ((${#need[@]})); then
  echo "installing: ${need[*]}" >&2
  sudo_cmd=""; [ "$(id -u)" = 0 ] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq && $sudo_cmd apt-get install -y -qq "${need[@]}"
fi
command -v cargo >/dev/null || { echo "error: cargo not found: install Rust with rustup (https://rustup.rs)" >&2; exit 1; }
