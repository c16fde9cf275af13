#!/usr/bin/env bash
# Installs what queue_pg needs on a fresh Debian machine that has the Rust toolchain, then builds
# the extension and installs it into the system PostgreSQL 15. Safe to run again: each step is
# skipped when already done (the build is incremental).
#
#   scripts/setup.sh           # release build (what the demo, tests and benchmarks use)
set -euo pipefail
cd "$(dirname "$0")/.."

PG_CONFIG=/usr/lib/postgresql/15/bin/pg_config
PGRX_VERSION=0.18.0
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

say() { printf '\033[1m==> %s\033[0m\n' "$*"; }

# 1. Debian packages: PostgreSQL 15 (server, headers), clang for bindgen, Redis, sudo.
packages=(postgresql-15 postgresql-server-dev-15 libclang-dev clang redis-server redis-tools sudo)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    say "installing Debian packages: ${missing[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi
# Debian's postgresql package may start its own cluster on 5432; queue_pg's stacks use their own.

# 2. cargo-pgrx, pinned to the pgrx version in Cargo.toml.
if ! cargo pgrx --version 2>/dev/null | grep -q "$PGRX_VERSION"; then
    say "installing cargo-pgrx $PGRX_VERSION (takes several minutes)"
    cargo install cargo-pgrx --version "$PGRX_VERSION" --locked
fi
if ! grep -qs "^pg15 = \"$PG_CONFIG\"" "${PGRX_HOME:-$HOME/.pgrx}/config.toml"; then
    say "cargo pgrx init --pg15"
    cargo pgrx init --pg15 "$PG_CONFIG" >/dev/null
fi

# 3. Build and install the extension into the system PostgreSQL 15.
say "building and installing queue_pg (release)"
log=$(mktemp)
if ! cargo pgrx install --release --pg-config "$PG_CONFIG" >"$log" 2>&1; then
    cat "$log" >&2
    echo "building or installing queue_pg failed" >&2
    exit 1
fi
rm -f "$log"
test -f "$($PG_CONFIG --pkglibdir)/queue_pg.so" || { echo "queue_pg.so was not installed" >&2; exit 1; }
