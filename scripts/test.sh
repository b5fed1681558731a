#!/usr/bin/env bash
# Runs hpo's test suite in ./.venv, installing what the tests need first (CPU build of torch).
# Redis and PostgreSQL tests use HPO_TEST_REDIS_URL / HPO_TEST_POSTGRES_URL, or start private
# servers from redis-server / initdb on PATH; MySQL tests use HPO_TEST_MYSQL_URL. Each pytest-xdist
# process uses its own Redis database (HPO_TEST_REDIS_URL's, then the one below) and PostgreSQL database.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
. .venv/bin/activate
# mlflow-skinny: the tracking client that the mlflow logger uses (full mlflow, its server and UI,
# depends on it); the logger's test runs on it, 40 s of install less.
pip install -q --disable-pip-version-check torch==2.13.0 -e '.[all,dev,tensorboard,onnx]' 'mlflow-skinny>=3'
# Two processes (pytest-xdist): most end-to-end tests wait on workers, heartbeats and servers, so
# two share 2 cores well; HPO_TEST_PROCESSES=0 runs everything in this process (e.g. under a debugger).
exec python -m pytest -n "${HPO_TEST_PROCESSES:-2}" "$@"
