#!/usr/bin/env bash
# Device call N1: checks what the 2026-12-02 sessions built without device time. Run from the repository root.
#  1. GPU tests: CUDA-graph decode steps bit-identical to launched ones; packed attention against each sample alone;
#     the fused decoder (its default path changed: set_step, workspace slots) against TorchSharp.
#  2. bench decode with graphs off / on, beside the compiled PyTorch decoder (issue 15's decode targets).
# Carry: .gpu/app (CLI + Bench.Serve + GPU tests), .gpu/cfg, .gpu/tools, .gpu/fixtures.tar.xz
source docs/results/next-device-calls/setup.sh
ts gpu-tests
( OUT=$R GPU_TESTS_TIMEOUT=200 VLMTUNE_FIXTURES=$ROOT/.gpu/fixtures.tar.xz bash tools/run_gpu_tests.sh $A \
    -class VlmTune.Gpu.Tests.FusedDecoderGraphTests -class VlmTune.Gpu.Tests.PackedAttentionTests \
    -class VlmTune.Gpu.Tests.FusedDecoderNumericsTests > /dev/null 2>&1; echo "gpu tests rc=$?" ) | tee $R/gpu-tests-rc.txt
grep -E "Total tests|Failed|Passed:|\[FAIL\]" $R/gpu-tests.log | tail -8
D="timeout 100 $V bench decode --config $C --device cuda --batch 1 8 32 64 --prompt-tokens 3400 --tiles 13 --new-tokens 128 --warmup 8"
ts decode-launched; $D > $R/bench-decode.jsonl 2>$R/bench-decode.err; cut -c1-220 $R/bench-decode.jsonl
ts decode-graphs; VLMTUNE_CUDA_GRAPHS=1 $D > $R/bench-decode-graphs.jsonl 2>$R/bench-decode-graphs.err; cut -c1-300 $R/bench-decode-graphs.jsonl
ts decode-ref; timeout 150 python3 .gpu/tools/decode_ref_compiled.py 1 8 32 64 > $R/decode-ref.txt 2>&1; tail -5 $R/decode-ref.txt
ts done
(cd $R && tar cJf $OUT/res-n1.tar.xz .)
