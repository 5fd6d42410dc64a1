# The two commands for a fresh machine:  make demo   and   make test
.PHONY: setup demo test lint unit e2e bench charts image clean

# setup runs again only when what it installs from changed (the stamp is newer otherwise);
# `make clean` or deleting .venv forces it.
setup: .venv/.setup-done

.venv/.setup-done: pyproject.toml setup.py scripts/setup.sh
	scripts/setup.sh
	touch $@

demo: setup
	.venv/bin/dbmtls demo

lint: setup
	.venv/bin/ruff check src tests bench
	.venv/bin/ruff format --check src tests bench
	.venv/bin/mypy

# DBMTLS_REQUIRE_NATIVE: setup built the native extension, so a test that cannot load it fails
test: lint
	DBMTLS_REQUIRE_NATIVE=1 .venv/bin/pytest -q

unit: setup
	.venv/bin/pytest -q tests/unit

# dbmtls:<version> and dbmtls:latest (docs/kubernetes.md, "The image"); IMAGE=, BASE= override
image: setup
	scripts/image.sh

# every suite, both data planes, and docs/bench/*.png redrawn from it (bench/README.md: ~15-20 min on 2 cores)
bench:
	scripts/setup.sh bench
	.venv/bin/python bench/run.py --suite redis,pg,mysql,memory --plane both --mem-churn 5000,1000 --charts

# docs/bench/*.png (the README's Performance section) from the newest bench/results/*.json
charts: setup
	.venv/bin/python bench/charts.py --out docs/bench/

clean:
	rm -rf .venv .mypy_cache .ruff_cache .pytest_cache .hypothesis
