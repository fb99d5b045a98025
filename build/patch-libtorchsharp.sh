#!/usr/bin/env bash
# Makes every libLibTorchSharp.so under DIR loadable on systems whose libstdc++ predates GLIBCXX_3.4.32 (Debian 12).
# Usage: patch-libtorchsharp.sh [--always] DIR   Idempotent; a no-op where the system libstdc++ is new enough, unless
# --always (a package that must load on Debian 12 wherever it was built).
set -euo pipefail
always=false
if [ "${1:-}" = --always ]; then always=true; shift; fi
dir=${1:?usage: patch-libtorchsharp.sh [--always] DIR}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
symbol=_ZSt21ios_base_library_initv   # std::ios_base_library_init(), the one symbol that needs GLIBCXX_3.4.32

libstdcxx=$(ldconfig -p 2>/dev/null | awk '/libstdc\+\+\.so\.6 /{print $NF; exit}')
if [ "$always" = false ] && { [ -z "$libstdcxx" ] || grep -aq GLIBCXX_3.4.32 "$libstdcxx"; }; then exit 0; fi

mapfile -t libs < <(find "$dir" -name libLibTorchSharp.so -type f 2>/dev/null)
[ ${#libs[@]} -gt 0 ] || exit 0

if ! command -v patchelf >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "vlmtune build: installing patchelf (needed to patch TorchSharp for this libstdc++)" >&2
    (apt-get install -y -qq patchelf >/dev/null 2>&1 || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq patchelf >/dev/null 2>&1; }) || true
  fi
  command -v patchelf >/dev/null || { echo "error VLMTUNE001: patchelf is required to patch TorchSharp on this system: apt-get install patchelf" >&2; exit 1; }
fi
command -v g++ >/dev/null || { echo "error VLMTUNE002: g++ is required to build libstdcxx-compat.so: apt-get install g++" >&2; exit 1; }

for lib in "${libs[@]}"; do
  libdir=$(dirname "$lib")
  if patchelf --print-needed "$lib" | grep -qx libstdcxx-compat.so; then
    [ -f "$libdir/libstdcxx-compat.so" ] && continue
  else
    patchelf --clear-symbol-version "$symbol" "$lib"
    python3 "$here/weaken-verneed.py" "$lib" GLIBCXX_3.4.32
    patchelf --add-needed libstdcxx-compat.so "$lib"
  fi
  # Older libstdc++ initialises iostreams through ios_base::Init objects; do the same work under the new name.
  printf '#include <ios>\nnamespace std { void ios_base_library_init() { static ios_base::Init init; } }\n' > "$libdir/.stdcxx-compat.cc"
  g++ -O2 -shared -fPIC -o "$libdir/libstdcxx-compat.so" "$libdir/.stdcxx-compat.cc"
  rm -f "$libdir/.stdcxx-compat.cc"
done
