#!/usr/bin/env bash
# Patches every libLibTorchSharp.so under DIR, in place and idempotently:
#  - always: TorchSharp's Scalar disposal goes through deferred-scalar-free.cc (a Scalar can be freed by its finaliser
#    while libtorch still reads it; docs/torchsharp-scalar-race.md);
#  - where the system libstdc++ predates GLIBCXX_3.4.32 (Debian 12), or with --always (a package that must load on
#    Debian 12 wherever it was built): the library loads with that libstdc++ (docs/torchsharp-on-debian12.md).
# Usage: patch-libtorchsharp.sh [--always] DIR
set -euo pipefail
always=false
if [ "${1:-}" = --always ]; then always=true; shift; fi
dir=${1:?usage: patch-libtorchsharp.sh [--always] DIR}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
symbol=_ZSt21ios_base_library_initv   # std::ios_base_library_init(), the one symbol that needs GLIBCXX_3.4.32
scalar_fix=libdeferred-scalar-free.so

mapfile -t libs < <(find "$dir" -name libLibTorchSharp.so -type f 2>/dev/null)
[ ${#libs[@]} -gt 0 ] || exit 0

# awk reads to the end: leaving at the first match would let ldconfig die of SIGPIPE (its listing is over a pipe
# buffer here, 69 KB), and pipefail plus set -e then end this script with status 141, patching nothing.
libstdcxx=$(ldconfig -p 2>/dev/null | awk '!found && /libstdc\+\+\.so\.6 /{print $NF; found = 1}')
old_libstdcxx=$always
if [ -n "$libstdcxx" ] && ! grep -aq GLIBCXX_3.4.32 "$libstdcxx"; then old_libstdcxx=true; fi

if ! command -v patchelf >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "vlmtune build: installing patchelf (needed to patch TorchSharp)" >&2
  (apt-get install -y -qq patchelf >/dev/null 2>&1 || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq patchelf >/dev/null 2>&1; }) || true
fi
missing=()
command -v patchelf >/dev/null || missing+=(patchelf)
command -v g++ >/dev/null || missing+=(g++)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$old_libstdcxx" = true ]; then
    echo "error VLMTUNE001: ${missing[*]} required to patch TorchSharp for this system's libstdc++: apt-get install ${missing[*]}" >&2
    exit 1
  fi
  # Without them TorchSharp still loads here; only the Scalar fix is left out, so say so and go on.
  echo "warning VLMTUNE003: ${missing[*]} not found, so TorchSharp's Scalar disposal is not made safe (docs/torchsharp-scalar-race.md): apt-get install ${missing[*]}" >&2
  exit 0
fi

for lib in "${libs[@]}"; do
  libdir=$(dirname "$lib")
  needed=$(patchelf --print-needed "$lib")
  if [ "$old_libstdcxx" = true ]; then
    if ! grep -qx libstdcxx-compat.so <<<"$needed"; then
      patchelf --clear-symbol-version "$symbol" "$lib"
      python3 -B "$here/weaken-verneed.py" "$lib" GLIBCXX_3.4.32
      patchelf --add-needed libstdcxx-compat.so "$lib"
    fi
    if [ ! -f "$libdir/libstdcxx-compat.so" ]; then
      # Older libstdc++ initialises iostreams through ios_base::Init objects; do the same work under the new name.
      printf '#include <ios>\nnamespace std { void ios_base_library_init() { static ios_base::Init init; } }\n' > "$libdir/.stdcxx-compat.cc"
      g++ -O2 -shared -fPIC -o "$libdir/.libstdcxx-compat.so.tmp" "$libdir/.stdcxx-compat.cc"
      rm -f "$libdir/.stdcxx-compat.cc"
      mv -f "$libdir/.libstdcxx-compat.so.tmp" "$libdir/libstdcxx-compat.so"
    fi
  fi
  if ! grep -qx "$scalar_fix" <<<"$needed"; then
    python3 -B "$here/localize-symbol.py" "$lib" THSTorch_dispose_scalar
    patchelf --add-needed "$scalar_fix" "$lib"
  fi
  # Built under a temporary name and renamed, as the compat library above: a build killed mid-compile leaves no
  # half-written library that a later run would take as done.
  if [ ! -f "$libdir/$scalar_fix" ] || [ "$here/deferred-scalar-free.cc" -nt "$libdir/$scalar_fix" ]; then
    g++ -O2 -std=c++17 -shared -fPIC -o "$libdir/.$scalar_fix.tmp" "$here/deferred-scalar-free.cc"
    mv -f "$libdir/.$scalar_fix.tmp" "$libdir/$scalar_fix"
  fi
done
