#!/usr/bin/env bash
# Run a command that needs a display (napari): as it is where there is one, else under Xvfb,
# installing Xvfb and Mesa first when this user can (scripts/system_deps.sh). Where it cannot,
# system_deps.sh prints the one command to run, and this exits 2 without running anything.
set -uo pipefail
if [ -n "${DISPLAY:-}" ]; then exec "$@"; fi
bash "$(dirname "$0")/system_deps.sh" install || exit 2
exec xvfb-run -a -s "-screen 0 1600x1000x24" "$@"
