.PHONY: setup demo lint test

setup: .venv/.moebench-installed

.venv/.moebench-installed: pyproject.toml scripts/setup.sh
	scripts/setup.sh
	touch $@

demo: setup
	.venv/bin/moebench demo

lint: setup
	.venv/bin/ruff check .

test: setup
	.venv/bin/python -m pytest -q tests
