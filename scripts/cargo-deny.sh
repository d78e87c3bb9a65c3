#!/usr/bin/env bash
# Dependency audit: advisories, bans, licenses, sources (deny.toml).
#
# No network here, so the RustSec advisory database is read from an offline copy:
# $SERVICE_CA_ADVISORY_DB, else ../shared/advisory-db next to the checkout, else
# /work/shared/advisory-db. cargo-deny wants a git checkout at a fixed place, so the
# copy is committed into target/advisory-db once, dated with the copy's own date so
# that the staleness check stays honest.
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"
if ! command -v cargo-deny >/dev/null; then
  echo "cargo-deny is not installed: cargo install cargo-deny --locked --version 0.20.2 (.ci/run does this)" >&2
  exit 1
fi
src=""
for candidate in "${SERVICE_CA_ADVISORY_DB:-}" "$top/../shared/advisory-db" /work/shared/advisory-db; do
  if [ -n "$candidate" ] && [ -d "$candidate/crates" ]; then src=$(cd "$candidate" && pwd); break; fi
done
if [ -z "$src" ]; then
  echo "no offline RustSec advisory database found: set SERVICE_CA_ADVISORY_DB to a copy of rustsec/advisory-db" >&2
  exit 1
fi
db="$top/target/advisory-db/advisory-db-3157b0e258782691"
stamp="$db/.source"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$src" ]; then
  rm -rf "$db"
  mkdir -p "$db"
  cp -r "$src/." "$db/"
  # The copy's date: the first line of its README note, or its files' newest mtime.
  date=$(grep -oE '\(20[0-9]{2}-[0-9]{2}-[0-9]{2}\)' "$src/../advisory-db.txt" 2>/dev/null | head -1 | tr -d '()')
  date=${date:-$(date -u -r "$src" +%Y-%m-%d)}
  (
    cd "$db"
    git init -q
    git add -A
    GIT_AUTHOR_DATE="${date}T00:00:00Z" GIT_COMMITTER_DATE="${date}T00:00:00Z" \
      git -c user.name=offline -c user.email=offline@localhost commit -qm "offline copy of rustsec/advisory-db ($date)"
  )
  echo "$src" >"$stamp"
fi
# cargo-deny reads `cargo metadata` for every platform, offline: make sure the crates of
# other platforms (windows-sys, ...) that a Linux build never downloads are present.
cargo fetch --locked --quiet
exec cargo deny --offline check all
