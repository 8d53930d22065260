#!/usr/bin/env bash
# Build the example plugins (C against the raw Proxy-Wasm 0.2.1 ABI) into examples/<name>/plugin.wasm.
#
# Usage: examples/build.sh [--out DIR]    DIR/<name>/plugin.wasm instead of in place
#
# The build is deterministic — no debug info, no names, no build paths — so a rebuild with the same
# toolchain (recorded in examples/TOOLCHAIN) is byte-identical to the committed plugin.wasm files;
# tests/examples/test_examples_reproducible.py checks that.
set -euo pipefail
cd "$(dirname "$0")"

die() { echo "examples/build.sh: $*" >&2; exit 1; }

out=""
if [ $# -gt 0 ]; then
  [ "$1" = "--out" ] && [ $# -eq 2 ] || die "usage: examples/build.sh [--out DIR]"
  out=$2
fi
command -v clang >/dev/null 2>&1 || die "missing tool 'clang' (install: apt-get install clang lld wasi-libc libclang-rt-dev-wasm32)"
command -v wasm-ld >/dev/null 2>&1 || die "missing tool 'wasm-ld' (install: apt-get install lld)"
[ -f /usr/lib/wasm32-wasi/crt1-reactor.o ] || die "missing wasi-libc sysroot /usr/lib/wasm32-wasi (install: apt-get install wasi-libc)"

for name in request-tracking rate-limit basic-auth; do
  [ -f "$name/plugin.c" ] || die "missing source $name/plugin.c"
  target_dir=${out:+$out/$name}
  target_dir=${target_dir:-$name}
  mkdir -p "$target_dir"
  # Relative paths only, and -ffile-prefix-map in case a header path ever lands in the output.
  clang --target=wasm32-wasi -mexec-model=reactor -O2 -g0 -Wall -Wextra -Werror \
    -ffile-prefix-map="$PWD"=. -I common \
    -Wl,--strip-all -Wl,--export=malloc \
    -o "$target_dir/plugin.wasm.tmp" "$name/plugin.c" || die "clang failed for $name/plugin.c"
  mv "$target_dir/plugin.wasm.tmp" "$target_dir/plugin.wasm"
  echo "built $target_dir/plugin.wasm"
done
