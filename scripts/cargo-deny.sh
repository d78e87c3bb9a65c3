#!/usr/bin/env bash
# Dependency audit: advisories, bans, licenses, sources (deny.toml). Sets itself up:
#
# 1. cargo-deny 0.20.2: the one on PATH if it is that version, else a copy cached
#    outside the checkout (${SERVICE_CA_CACHE_DIR:-~/.cache/service-ca-operator}/
#    cargo-deny-0.20.2), installed there with `cargo install` the first time (4-5 min).
# 2. The RustSec advisory database: fetched the ordinary way (cargo-deny's own fetch,
#    into db-path of deny.toml, target/advisory-db) when the network allows; otherwise an offline copy:
#    $SERVICE_CA_ADVISORY_DB, else ../shared/advisory-db next to the checkout, else
#    /work/shared/advisory-db. cargo-deny wants a git checkout at a fixed place, so the
#    copy is committed into target/advisory-db once, dated with the copy's own date so
#    that the staleness check stays honest. Neither: a clear error.
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"
version=0.20.2
cache=${SERVICE_CA_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/service-ca-operator}
deny=""
if command -v cargo-deny >/dev/null && cargo-deny --version 2>/dev/null | grep -qw "$version"; then
  deny=$(command -v cargo-deny)
elif [ -x "$cache/cargo-deny-$version/bin/cargo-deny" ]; then
  deny="$cache/cargo-deny-$version/bin/cargo-deny"
else
  echo "installing cargo-deny $version into $cache/cargo-deny-$version (once; about 4-5 minutes)" >&2
  start=$(date +%s)
  if ! cargo install cargo-deny --locked --version "$version" --root "$cache/cargo-deny-$version.tmp.$$" >&2; then
    rm -rf "$cache/cargo-deny-$version.tmp.$$"
    echo "cannot install cargo-deny $version (it needs crates.io): install it yourself with" >&2
    echo "  cargo install cargo-deny --locked --version $version" >&2
    exit 1
  fi
  rm -rf "$cache/cargo-deny-$version"
  mv "$cache/cargo-deny-$version.tmp.$$" "$cache/cargo-deny-$version"
  echo "installed cargo-deny $version in $(( $(date +%s) - start ))s" >&2
  deny="$cache/cargo-deny-$version/bin/cargo-deny"
fi

# cargo-deny reads `cargo metadata` for every platform: make sure the crates of other
# platforms (windows-sys, ...) that a Linux build never downloads are present.
cargo fetch --locked --quiet

# The ordinary way: cargo-deny fetches the advisory database itself.
if [ -z "${SERVICE_CA_ADVISORY_DB:-}" ] && timeout 60 "$deny" deny fetch db >/dev/null 2>&1; then
  echo "advisory database: fetched (online)" >&2
  exec "$deny" deny --offline check all
fi

src=""
for candidate in "${SERVICE_CA_ADVISORY_DB:-}" "$top/../shared/advisory-db" /work/shared/advisory-db; do
  if [ -n "$candidate" ] && [ -d "$candidate/crates" ]; then src=$(cd "$candidate" && pwd); break; fi
done
if [ -z "$src" ]; then
  echo "the RustSec advisory database cannot be fetched (no network to github.com) and no offline copy was found:" >&2
  echo "set SERVICE_CA_ADVISORY_DB to a copy of https://github.com/rustsec/advisory-db (or put one at ../shared/advisory-db)" >&2
  exit 1
fi
echo "advisory database: offline copy $src" >&2
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
exec "$deny" deny --offline check all
