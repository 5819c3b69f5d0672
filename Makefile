# Two commands on a fresh machine:  `make demo` (the main job)  and  `make test`.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup demo demo-headless test test-core benchmark clean

setup: $(STAMP)

$(STAMP): setup.cfg pyproject.toml scripts/install_torch.sh
	test -x $(PY) || python3 -m venv $(VENV)
	bash scripts/install_torch.sh $(PY)
	$(PY) -m pip install -e ".[testing]"
	touch $(STAMP)

# napari with the demo data and the SGRS panel. With no display it installs Xvfb and Mesa when it
# can (scripts/system_deps.sh), runs the same loop headless and saves a screenshot; where it
# cannot, it runs the engine demo (the preview setting) instead.
demo: setup
	@if [ -n "$$DISPLAY" ]; then $(PY) -m napari_sgrs._napari.demo_app; \
	elif bash scripts/system_deps.sh install; then \
	  echo "no display: running the napari loop headless under Xvfb (under a minute on 2 CPU cores)"; \
	  bash scripts/with_display.sh $(PY) -m napari_sgrs._napari.demo_app --headless-screenshot demo/screenshot.png \
	    && echo "done: open $(CURDIR)/demo/screenshot.png to see the pseudo labels and synergy regions"; \
	else echo "no display and no Xvfb: running the engine demo instead (demo data, 300 preview-sized steps," \
	          "pseudo labels with regions, evaluation; about 2 minutes on 2 CPU cores)"; \
	  $(VENV)/bin/sgrs demo demo; fi

# The engine alone: demo data -> train -> predict with regions -> evaluate.
demo-headless: setup
	$(VENV)/bin/sgrs demo demo

# Installs Xvfb and Mesa first when there is no display and this user can (root or
# passwordless sudo); else prints the one command to run and exits 2.
test: setup
	bash scripts/with_display.sh $(PY) -m pytest -q

test-core: setup
	$(PY) -m pytest -q tests/core tests/project

clean:
	rm -rf demo runs .pytest_cache
