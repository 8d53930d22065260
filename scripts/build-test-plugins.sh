#!/usr/bin/env bash
# Build wasmesh's own test plugins into tests/plugins/build/:
#   C    tests/plugins/c/*.c      -> build/<name>.wasm     (clang --target=wasm32-wasi, WASI reactor)
#   WAT  tests/plugins/wat/*.wat  -> build/<name>.wasm     (wabt wat2wasm)
#   AS   tests/plugins/as/assembly/<name>.ts -> build/as-<name>.wasm
#        (assemblyscript 0.14 + @solo-io/proxy-runtime 0.1.8, pinned by tests/plugins/as/package-lock.json)
#
# Usage: scripts/build-test-plugins.sh [c] [wat] [as]     (no argument = all three)
#        WASMESH_TEST_PLUGINS_OUT=DIR overrides the output directory.
# Idempotent: an output newer than its inputs (source, shared header, this script) is left alone.
# Any failure stops the build with one line on stderr naming the tool or file.
set -euo pipefail
cd "$(dirname "$0")/.."

SRC=tests/plugins
OUT=${WASMESH_TEST_PLUGINS_OUT:-$SRC/build}
SCRIPT=scripts/build-test-plugins.sh
ABI_HEADER=examples/common/proxy_wasm_abi.h

die() { echo "build-test-plugins: $*" >&2; exit 1; }
need() { command -v "$1" >/dev/null 2>&1 || die "missing tool '$1' (install: $2)"; }

# up_to_date OUTPUT INPUT... : true when OUTPUT exists and is newer than every INPUT.
up_to_date() {
  local output=$1; shift
  [ -f "$output" ] || return 1
  local input
  for input in "$@"; do
    [ "$input" -nt "$output" ] && return 1
  done
  return 0
}

build_c() {
  need clang "apt-get install clang lld wasi-libc libclang-rt-dev-wasm32"
  need wasm-ld "apt-get install lld"
  [ -f /usr/lib/wasm32-wasi/crt1-reactor.o ] || die "missing wasi-libc sysroot /usr/lib/wasm32-wasi (install: apt-get install wasi-libc)"
  local source name output
  for source in "$SRC"/c/*.c; do
    [ -e "$source" ] || continue
    name=$(basename "$source" .c)
    output="$OUT/$name.wasm"
    up_to_date "$output" "$source" "$ABI_HEADER" "$SCRIPT" && continue
    # Reactor (exports _initialize); keep the name section for readable trap backtraces, drop DWARF;
    # map the checkout path away so the binary does not depend on where it was built.
    clang --target=wasm32-wasi -mexec-model=reactor -O2 -g0 -Wall -Wextra -Werror \
      -ffile-prefix-map="$PWD"=. -I examples/common \
      -Wl,--export=malloc -Wl,--strip-debug \
      -o "$output.tmp" "$source" 2>"$OUT/$name.log" \
      || die "clang failed for $source (see $OUT/$name.log)"
    mv "$output.tmp" "$output"
    rm -f "$OUT/$name.log"
    echo "built $output"
  done
}

build_wat() {
  need wat2wasm "apt-get install wabt"
  local source name output
  for source in "$SRC"/wat/*.wat; do
    [ -e "$source" ] || continue
    name=$(basename "$source" .wat)
    output="$OUT/$name.wasm"
    up_to_date "$output" "$source" "$SCRIPT" && continue
    wat2wasm "$source" -o "$output.tmp" 2>"$OUT/$name.log" || die "wat2wasm failed for $source (see $OUT/$name.log)"
    mv "$output.tmp" "$output"
    rm -f "$OUT/$name.log"
    echo "built $output"
  done
}

build_as() {
  need node "apt-get install nodejs"
  need npm "apt-get install npm"
  local project=$SRC/as
  [ -f "$project/package-lock.json" ] || die "missing $project/package-lock.json"
  # npm ci only when the lock file changed since the last install.
  if ! up_to_date "$project/node_modules/.package-lock.json" "$project/package-lock.json"; then
    (cd "$project" && npm ci --no-audit --no-fund --loglevel=error >/dev/null 2>"npm-ci.log") \
      || die "npm ci failed in $project (see $project/npm-ci.log)"
    rm -f "$project/npm-ci.log"
    touch "$project/node_modules/.package-lock.json"
  fi
  local asc="$project/node_modules/.bin/asc"
  [ -x "$asc" ] || die "assemblyscript compiler missing at $asc after npm ci"
  local abs_out source name output
  abs_out=$(cd "$OUT" && pwd)
  for source in "$project"/assembly/*.ts; do
    [ -e "$source" ] || continue
    name=$(basename "$source" .ts)
    output="$OUT/as-$name.wasm"
    up_to_date "$output" "$source" "$project/package-lock.json" "$SCRIPT" && continue
    # abort_proc_exit: the SDK's abort hook, so a failed assertion logs and exits instead of importing env.abort.
    # asc resolves the SDK from node_modules relative to the working directory.
    (cd "$project" && node_modules/.bin/asc "assembly/$name.ts" -b "$abs_out/as-$name.wasm.tmp" \
      --use abort=abort_proc_exit -O3 --noAssert) >"$OUT/as-$name.log" 2>&1 \
      || die "asc failed for $source (see $OUT/as-$name.log)"
    mv "$output.tmp" "$output"
    rm -f "$OUT/as-$name.log"
    echo "built $output"
  done
}

mkdir -p "$OUT"
families=("$@")
[ ${#families[@]} -gt 0 ] || families=(c wat as)
for family in "${families[@]}"; do
  case "$family" in
    c) build_c ;;
    wat) build_wat ;;
    as) build_as ;;
    *) die "unknown plugin family '$family' (expected c, wat or as)" ;;
  esac
done
