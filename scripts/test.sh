#!/usr/bin/env bash
# Runs the whole test suite: installs and builds what is needed (scripts/setup.sh), checks
# formatting and clippy, then runs the end-to-end tests in pg_test/ against a throwaway
# PostgreSQL 15 cluster (queue_pg preloaded) and a real redis-server, which it stops at the end.
#
#   scripts/test.sh                 # everything
#   scripts/test.sh -k dispatch     # extra arguments go to pytest
set -euo pipefail
cd "$(dirname "$0")/.."

export QPG_TEST_HOME=${QPG_TEST_HOME:-/tmp/queue_pg_test}
export QPG_TEST_PGPORT=${QPG_TEST_PGPORT:-15442}
export QPG_TEST_REDIS_PORT=${QPG_TEST_REDIS_PORT:-16389}

scripts/setup.sh

echo "==> cargo fmt --check, cargo clippy (the extension and the Rust example worker)"
cargo fmt --all -- --check
cargo clippy --release --all-targets --quiet -- -D warnings
cargo fmt --manifest-path examples/rust/Cargo.toml -- --check
cargo clippy --manifest-path examples/rust/Cargo.toml --release --quiet -- -D warnings

echo "==> unit tests (cargo test)"
cargo test --release --lib --quiet

echo "==> the previous release, built from its tag, for the upgrade test"
scripts/build_release.sh 0.1.0

echo "==> Python test dependencies and the Python example's (.venv)"
[ -x .venv/bin/pip ] || python3 -m venv .venv
.venv/bin/pip install --quiet --disable-pip-version-check -r pg_test/requirements.txt \
    -r examples/python/requirements.txt

echo "==> the Node.js and Rust example workers (npm ci, cargo build)"
if ! command -v npm >/dev/null; then
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq nodejs npm >/dev/null
fi
(cd examples/node && npm ci --no-audit --no-fund --loglevel=error >/dev/null)
cargo build --manifest-path examples/rust/Cargo.toml --release --quiet

# Whatever happens to pytest, stop the cluster and Redis it started.
trap 'QPG_HOME=$QPG_TEST_HOME QPG_PGPORT=$QPG_TEST_PGPORT QPG_REDIS_PORT=$QPG_TEST_REDIS_PORT scripts/stack.sh down' EXIT
echo "==> end-to-end tests (pg_test/)"
.venv/bin/pytest pg_test "$@"
