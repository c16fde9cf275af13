#!/usr/bin/env bash
# Builds an earlier release of queue_pg from its git tag into a package directory (the files
# `cargo pgrx package` lays out under usr/), for the upgrade test. Nothing is installed: the test
# swaps the files in and out itself. Skipped when the package is already there.
#
#   scripts/build_release.sh 0.1.0      # -> target/releases/0.1.0/usr/...
set -euo pipefail
cd "$(dirname "$0")/.."

version=${1:?usage: scripts/build_release.sh VERSION}
PG_CONFIG=/usr/lib/postgresql/15/bin/pg_config
out="$PWD/target/releases/$version"

# A clone that did not fetch tags still has the release commit in main's history.
declare -A release_commit=([0.1.0]=0bb13649439a5f1be2a14ab02a4509af224a336e)

if [ -f "$out/.built" ]; then
    exit 0
fi
rev="v$version"
if ! git rev-parse --verify --quiet "$rev^{commit}" >/dev/null; then
    rev=${release_commit[$version]:?no tag v$version and no recorded commit for it}
    git cat-file -e "$rev^{commit}" 2>/dev/null || {
        echo "release $version: neither tag v$version nor commit $rev is in this clone" >&2
        echo "(a shallow clone? run: git fetch --unshallow --tags)" >&2
        exit 1
    }
fi

src="$PWD/target/releases/src-$version"
rm -rf "$src" "$out"
mkdir -p "$src"
git archive "$rev" | tar -x -C "$src"
# Its own target directory: both builds write target/release/libqueue_pg.so, and cargo would
# take the other build's file for its own.
target_dir="$PWD/target/releases/target"
echo "==> building queue_pg $version from $rev (a full build, several minutes)"
log=$(mktemp)
if ! (cd "$src" && CARGO_TARGET_DIR="$target_dir" cargo pgrx package --pg-config "$PG_CONFIG" \
    --out-dir "$out" >"$log" 2>&1); then
    cat "$log" >&2
    echo "building queue_pg $version failed" >&2
    exit 1
fi
rm -f "$log"
rm -rf "$src"
touch "$out/.built"
