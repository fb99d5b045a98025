#!/usr/bin/env bash
# Runs the GPU tests (tests/VlmTune.Gpu.Tests, trait Category=Gpu) on a CUDA machine without the .NET SDK, from the
# self-contained test binary published into the CLI's folder (docs/performance.md, "GPU tests").
#
#   tools/run_gpu_tests.sh [APP] [runner options...]
#
# APP: that published folder, or a .tar.xz holding it as gpu/ (default .gpu/app/vlmtune.tar.xz). Runner options go to
# the xunit v3 runner, e.g. -class VlmTune.Gpu.Tests.Nf4KernelTests or -stopOnFail. Needs python3 with PyTorch (its
# CUDA libtorch is the one TorchSharp loads) and the shared fixtures at $VLMTUNE_FIXTURES (default .gpu/fixtures): a
# folder or a .tar.xz of one; only tiny-internvl2/model/config.json and model.safetensors are read. Writes to $OUT (default ./gpu-test-results):
# gpu-tests.log (the console, every step's logit agreement included), gpu-tests.trx, gpu-tests.xml (xunit v2+
# format) and gpu.txt (card, driver, PyTorch). The exit status is the runner's: 0 only when no test failed.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

app=${1:-.gpu/app/vlmtune.tar.xz}
[[ $# -gt 0 ]] && shift
out=${OUT:-$PWD/gpu-test-results}
mkdir -p "$out"

if [[ -f $app ]]; then
  unpacked=$(mktemp -d /tmp/vlmtune-app.XXXXXX)
  tar xJf "$app" -C "$unpacked" || { echo "cannot unpack $app" >&2; exit 2; }
  app=$unpacked/gpu
fi
bin=$app/VlmTune.Gpu.Tests
if [[ ! -x $bin ]]; then
  echo "$bin not found: publish tests/VlmTune.Gpu.Tests into the CLI's folder (docs/performance.md, GPU tests)" >&2
  exit 2
fi

torchlib=$(python3 -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))') \
  || { echo "python3 with PyTorch is needed: its libtorch is the one the tests run on" >&2; exit 2; }
export LD_LIBRARY_PATH=$torchlib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export VLMTUNE_FIXTURES=${VLMTUNE_FIXTURES:-$PWD/.gpu/fixtures}
export VLMTUNE_REPO_ROOT=$PWD   # the repository's own fixtures (tests/fixtures/families): the runner starts in the binary's folder
if [[ -f $VLMTUNE_FIXTURES ]]; then
  fixtures=$(mktemp -d /tmp/vlmtune-fixtures.XXXXXX)
  tar xJf "$VLMTUNE_FIXTURES" -C "$fixtures" || { echo "cannot unpack $VLMTUNE_FIXTURES" >&2; exit 2; }
  export VLMTUNE_FIXTURES=$fixtures
fi
[[ -f $VLMTUNE_FIXTURES/tiny-internvl2/model/model.safetensors ]] \
  || echo "warning: no $VLMTUNE_FIXTURES/tiny-internvl2/model/model.safetensors: the InternLM2 checkpoint cases will fail" >&2
# The kernels under test must be on, in their default configuration.
unset VLMTUNE_FUSED_DECODE VLMTUNE_FUSED_MMA VLMTUNE_FUSED_SKIP VLMTUNE_FUSED_GEMV_UNROLL VLMTUNE_FUSED_MMA_UNROLL VLMTUNE_NF4_KERNEL

{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'
} > "$out/gpu.txt" 2>&1

timeout "${GPU_TESTS_TIMEOUT:-540}" "$bin" -trait Category=Gpu -noColor -showLiveOutput \
  -result-trx "$out/gpu-tests.trx" -result-xml "$out/gpu-tests.xml" "$@" 2>&1 | tee "$out/gpu-tests.log"
exit "${PIPESTATUS[0]}"
