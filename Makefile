# napari-ctvlp: `make demo` and `make test` each set everything up themselves.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# Debian packages napari needs for OpenGL under a virtual X server.
DISPLAY_PKGS := xvfb xauth libxcb-cursor0 libxcb-icccm4 libxcb-keysyms1 libxcb-image0 \
	libxcb-render-util0 libxcb-xinerama0 libxcb-shape0 libxkbcommon-x11-0 libgl1 libegl1 \
	libglx-mesa0 libfontconfig1 libdbus-1-3
PYTEST_ARGS ?=

.PHONY: demo test setup sysdeps venv wheel-check bench clean

setup: sysdeps venv

# Installs the display packages when run as root and Xvfb is missing; otherwise checks.
sysdeps:
	@if command -v Xvfb >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then \
		echo "Installing display packages: $(DISPLAY_PKGS)"; \
		DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(DISPLAY_PKGS) >/dev/null; \
	else \
		echo "Xvfb is missing: install it (Debian/Ubuntu: sudo apt-get install $(DISPLAY_PKGS))" >&2; \
	fi

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ".[dev,training]"
	@touch $(STAMP)

demo: setup
	$(PY) -m napari_ctvlp.demo

test: setup
	QT_API=pyqt6 $(PY) -m pytest $(PYTEST_ARGS)

# Builds the wheel and validates the manifest from it in a throw-away venv.
wheel-check: setup
	$(PY) -m pytest tests/test_packaging.py -m slow -v

bench: setup
	@for b in benchmarks/[!_]*.py; do \
	  case $$b in *image_encoder_probe.py|*cagcl_ablation.py|*statistics_contrast_probe.py) echo "== $$b: skipped (needs --cache from training.prepare)"; continue;; esac; \
	  echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache
