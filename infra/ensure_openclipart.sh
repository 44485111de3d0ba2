#!/usr/bin/env bash
# Make sure the Open Clip Art Library (the default dataset's source) is on this machine.
# On Debian/Ubuntu as root it installs the packages; otherwise it says what to install.
set -euo pipefail
SVG_ROOT="${OPENCLIPART_SVG_ROOT:-/usr/share/openclipart/svg}"
if [ -d "$SVG_ROOT" ] && command -v rsvg-convert >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  echo "Installing openclipart-svg (the clip art) and librsvg2-bin (the rasteriser) with apt-get..."
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq openclipart-svg librsvg2-bin >/dev/null
  exit 0
fi
if [ ! -d "$SVG_ROOT" ]; then
  cat >&2 <<MSG
The default dataset is built from the Open Clip Art Library, which is not at $SVG_ROOT.
Install it (Debian/Ubuntu):   sudo apt-get install -y openclipart-svg librsvg2-bin
or point alignsearch at a copy: set data.svg_root in params.yaml (or OPENCLIPART_SVG_ROOT here),
or use the built-in generator:  .venv/bin/alignsearch data build --source synthetic --out data/synthetic
MSG
  exit 1
fi
echo "note: rsvg-convert not found; falling back to cairosvg (slower). Install librsvg2-bin for speed." >&2
