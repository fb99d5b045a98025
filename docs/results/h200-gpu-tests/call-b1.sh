#!/usr/bin/env bash
# Device call B1: every GPU test with the repository's family checkpoints (the tiny InternLM2 one is not carried: its
# rows passed in call H), the fused AdamW tests new.
R=/tmp/res; mkdir -p $R
OUT=$R GPU_TESTS_TIMEOUT=400 bash tools/run_gpu_tests.sh .gpu/gt/gputests.tar.xz > /dev/null 2>&1; echo "gpu tests rc=$?" | tee $R/gpu-tests-rc.txt
grep -E "Total:|\[FAIL\]" $R/gpu-tests.log | grep -v '"internlm2"' | tail -30
grep -c '"internlm2".*\[FAIL\]' $R/gpu-tests.log
(cd $R && tar cJf $OUT/res-b1.tar.xz .)
