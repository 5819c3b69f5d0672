# Two commands on a fresh machine:  `make demo` (the main job)  and  `make test`.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
XVFB   := $(shell command -v xvfb-run >/dev/null 2>&1 && echo "xvfb-run -a -s '-screen 0 1600x1000x24'")

.PHONY: setup demo demo-headless test test-core benchmark clean

setup: $(STAMP)

$(STAMP): setup.cfg pyproject.toml scripts/install_torch.sh
	test -x $(PY) || python3 -m venv $(VENV)
	bash scripts/install_torch.sh $(PY)
	$(PY) -m pip install -e ".[testing]"
	touch $(STAMP)

# napari with the demo data and the SGRS panel; with no display it runs the same loop
# headless and saves a screenshot (see README).
demo: setup
	@if [ -n "$$DISPLAY" ]; then $(PY) -m napari_sgrs._napari.demo_app; \
	elif [ -n "$(XVFB)" ]; then echo "no display: running the same loop headless under Xvfb"; \
	     $(XVFB) $(PY) -m napari_sgrs._napari.demo_app --headless-screenshot demo/screenshot.png; \
	else echo "no display and no xvfb-run (apt-get install xvfb): running the engine demo instead"; \
	     $(VENV)/bin/sgrs demo demo; fi

# The engine alone: demo data -> train -> predict with regions -> evaluate.
demo-headless: setup
	$(VENV)/bin/sgrs demo demo

test: setup
	@if [ -z "$$DISPLAY" ] && [ -z "$(XVFB)" ]; then \
	  echo "make test: the napari tests need a display and there is none: install Xvfb and Mesa" \
	       "(the apt-get line in .ci/run, or run .ci/run itself) or run 'make test-core' for the engine" \
	       "tests alone" >&2; exit 2; fi
	$(XVFB) $(PY) -m pytest -q

test-core: setup
	$(PY) -m pytest -q tests/core

clean:
	rm -rf demo runs .pytest_cache
