#!/usr/bin/env bash
# The system packages napari needs on a machine without a display: Xvfb (a virtual screen),
# Mesa (OpenGL for napari's canvas), the xcb libraries Qt loads and GLib (QtCore links it; the
# PyQt6 wheels bundle Qt but not these). One list, used by `make test`, `make demo` and .ci/run alike.
#
#   scripts/system_deps.sh missing   print the missing packages (nothing when all are there)
#   scripts/system_deps.sh install   install what is missing when this user can (root, or
#                                    passwordless sudo, with apt-get); exit 0 when all are there
#                                    afterwards, else print the one command to run and exit 2
#   scripts/system_deps.sh command   print that one command
set -uo pipefail

PACKAGES=(xvfb xauth libgl1-mesa-dri libglx-mesa0 libegl1
  libxkbcommon-x11-0 libxcb-icccm4 libxcb-image0 libxcb-keysyms1 libxcb-randr0
  libxcb-render-util0 libxcb-xinerama0 libxcb-xinput0 libxcb-xfixes0 libxcb-shape0
  libxcb-cursor0 libdbus-1-3 libfontconfig1 libglib2.0-0)

missing() {
  if command -v dpkg-query >/dev/null 2>&1; then
    for p in "${PACKAGES[@]}"; do
      dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q "install ok installed" || echo "$p"
    done
  else
    # not Debian: the library names differ; Xvfb itself is what we can check
    command -v xvfb-run >/dev/null 2>&1 || echo xvfb
  fi
}

install_command() {
  echo "sudo apt-get update && sudo apt-get install -y --no-install-recommends ${PACKAGES[*]}"
}

case "${1:-}" in
  missing) missing ;;
  command) install_command ;;
  install)
    todo=$(missing | tr '\n' ' ')
    [ -z "${todo// /}" ] && exit 0
    if [ "$(id -u)" = 0 ]; then sudo=""
    elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then sudo="sudo"
    else sudo="none"; fi
    if [ "$sudo" = none ] || ! command -v apt-get >/dev/null 2>&1; then
      echo "napari needs a virtual display and OpenGL that this machine lacks ($todo); this user cannot" \
           "install them (root or passwordless sudo with apt-get is needed). Run:" >&2
      echo "  $(install_command)" >&2
      exit 2
    fi
    echo "installing the system packages napari needs without a display: $todo"
    export DEBIAN_FRONTEND=noninteractive
    $sudo apt-get update -qq >/dev/null && \
      $sudo apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" >/dev/null || {
        echo "apt-get could not install them; run: $(install_command)" >&2; exit 2; }
    ;;
  *) echo "usage: $0 missing|install|command" >&2; exit 2 ;;
esac
