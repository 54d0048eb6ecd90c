#!/usr/bin/env bash
# Make sure the command-line tools named as arguments exist, installing the
# Debian packages that provide them when apt-get is available and we may use it.
# Usage: scripts/ensure-tools.sh curl [socat ...]
set -u
missing=()
for tool in "$@"; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
[ ${#missing[@]} -eq 0 ] && exit 0

declare -A package=( [curl]=curl [socat]=socat [nginx]=nginx-light [hey]=hey
                     [ss-server]=shadowsocks-libev [ss-local]=shadowsocks-libev
                     [microsocks]=microsocks [redis-server]=redis-server
                     [chromium]=chromium [chromedriver]=chromium-driver [zbarimg]=zbar-tools )
pkgs=()
for tool in "${missing[@]}"; do pkgs+=("${package[$tool]:-$tool}"); done

sudo=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then sudo="sudo -n"; fi
fi
if command -v apt-get >/dev/null 2>&1 && { [ "$(id -u)" -eq 0 ] || [ -n "$sudo" ]; }; then
  echo "installing ${pkgs[*]} with apt-get (missing: ${missing[*]})" >&2
  export DEBIAN_FRONTEND=noninteractive
  # Packages such as nginx start a system service when installed; the tests start their own
  # instances on loopback ports, so keep the package from starting one (policy-rc.d: 101 = no).
  made_policy=""
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' | $sudo tee /usr/sbin/policy-rc.d >/dev/null && \
      $sudo chmod +x /usr/sbin/policy-rc.d && made_policy=1
  fi
  $sudo apt-get update -qq >/dev/null 2>&1 || true
  $sudo apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null 2>&1 || true
  [ -n "$made_policy" ] && $sudo rm -f /usr/sbin/policy-rc.d
fi
still=()
for tool in "${missing[@]}"; do command -v "$tool" >/dev/null 2>&1 || still+=("$tool"); done
if [ ${#still[@]} -gt 0 ]; then
  echo "note: could not install ${still[*]}; tests that need it fail in CI and skip locally" >&2
fi
exit 0
