#!/usr/bin/env bash
# Install every test dependency on a fresh machine: Debian packages (Envoy's peers,
# the OCI registry, the wasm toolchains, load tools), wasmesh itself with its test
# extras from PyPI, node/npm and the npm SDKs the test plugins are built with.
# Idempotent and quiet: what is already there is left alone.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(docker-registry skopeo clang lld wasi-libc libclang-rt-dev-wasm32 wabt wrk apache2-utils openssl)
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
# The AssemblyScript test plugins need node and npm. Debian's nodejs/npm only when the commands are
# missing, so a newer node already installed (e.g. from NodeSource, which bundles npm) is not replaced.
command -v node >/dev/null 2>&1 || missing+=(nodejs)
command -v npm >/dev/null 2>&1 || missing+=(npm)
if [ "${#missing[@]}" -gt 0 ]; then
  echo "installing Debian packages: ${missing[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

python3 -m pip install -q --root-user-action=ignore --disable-pip-version-check -e '.[test]'

# Test plugins (AssemblyScript, C, WAT) are built from source by the test setup.
if [ -x scripts/build-test-plugins.sh ]; then
  scripts/build-test-plugins.sh
fi
