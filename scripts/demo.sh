#!/usr/bin/env bash
# `make demo`: napari with the demo cohort and the "SGRS: train" panel, trained with the panel's CPU
# setting (preview, napari_sgrs/core/settings.py PRESETS). Usage: scripts/demo.sh PYTHON [OUT]
#   a display:              napari opens; you drive the panel
#   no display:             the same loop runs by itself under Xvfb (installed first when this user
#                           can, scripts/system_deps.sh) and saves OUT/screenshot.png and OUT/panel.png
#   no display, no Xvfb:    the engine demo without a viewer (`sgrs demo OUT`); results in OUT/
set -uo pipefail
PY=$1
OUT=${2:-demo}
if [ -n "${DISPLAY:-}" ]; then exec "$PY" -m napari_sgrs._napari.demo_app; fi
if bash "$(dirname "$0")/system_deps.sh" install; then
  project="$OUT/napari-project"
  # the previous demo's project is replaced; a folder there that is not a project is left alone
  if [ -e "$project" ] && [ ! -e "$project/project.json" ]; then
    echo "error: $project exists and is not a napari-sgrs project; move it away (nothing was changed)" >&2
    exit 2
  fi
  rm -rf "$project"
  echo "no display: running the napari loop by itself under Xvfb, with the preview setting (about 2 min on 2 idle CPU cores, longer when other programs share them)"
  xvfb-run -a -s "-screen 0 1600x1000x24" "$PY" -m napari_sgrs._napari.demo_app \
    --headless-screenshot "$OUT/screenshot.png" --panel-screenshot "$OUT/panel.png" --project "$project" || exit 1
  echo "done: open $OUT/screenshot.png (the viewer at the worst pseudo label, with its regions) and" \
       "$OUT/panel.png (the panel); the project (run, pseudo labels) is $project"
else
  echo "no display and no Xvfb: running the engine demo instead: the same preview setting, no viewer" \
       "(a few minutes on 2 idle CPU cores); results in $OUT/"
  exec "$(dirname "$PY")/sgrs" demo "$OUT"
fi
