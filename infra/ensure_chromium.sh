#!/usr/bin/env bash
# Make sure a headless browser is on this machine for the search-page test (tests/catalogue/test_page.py):
# Debian's chromium + chromium-driver, driven through selenium (no browser download of its own).
# On Debian/Ubuntu as root it installs them; otherwise it says what to install (the test then skips).
set -euo pipefail
if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  echo "Installing chromium and chromium-driver (the search-page browser test) with apt-get..."
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq chromium chromium-driver >/dev/null
  exit 0
fi
cat >&2 <<MSG
The search-page test needs a headless Chromium and its driver, which are not installed.
Install them (Debian/Ubuntu):   sudo apt-get install -y chromium chromium-driver
MSG
exit 0
