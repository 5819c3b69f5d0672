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

# napari with the demo data and the SGRS panel, trained with the panel's CPU setting (preview). With
# no display the loop runs by itself under Xvfb and saves demo/screenshot.png and demo/panel.png;
# where Xvfb cannot be installed, the engine demo runs instead (scripts/demo.sh says which).
demo: setup
	@bash scripts/demo.sh $(PY) demo

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
