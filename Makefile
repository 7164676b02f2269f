.PHONY: setup demo test

setup: .venv/.moebench-installed

.venv/.moebench-installed: pyproject.toml scripts/setup.sh
	scripts/setup.sh
	touch $@

demo: setup
	.venv/bin/moebench demo

test: setup
	.venv/bin/python -m pytest -q tests
