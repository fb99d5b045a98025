#!/usr/bin/env bash
# Device call S4: the fused-decoder GPU tests on the family checkpoints (qwen2, qwen3, llama, llama_g6), which S2 could
# not carry beside the shared fixture; the internlm2 rows need the shared fixture, not carried here (they passed in S2).
export PYTHONUNBUFFERED=1
R=/tmp/res; mkdir -p $R
mkdir -p tests/fixtures/families && tar xJf .gpu/fam.tar.xz -C tests/fixtures/families
mkdir -p /tmp/app && tar xJf .gpu/app/vlmtune.tar.xz -C /tmp/app
( OUT=$R GPU_TESTS_TIMEOUT=300 bash tools/run_gpu_tests.sh /tmp/app/gpu -class VlmTune.Gpu.Tests.FusedDecoderNumericsTests > /dev/null 2>&1; echo "gpu tests rc=$?" ) > $R/gpu-tests-rc.txt
cat $R/gpu-tests-rc.txt; grep -E "Total:|\[FAIL\]" $R/gpu-tests.log | grep -v internlm2 | tail -6
(cd $R && tar cJf $OUT/res-s4.tar.xz .)
