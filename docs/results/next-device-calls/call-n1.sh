#!/usr/bin/env bash
# Next session's first device call (N1): what the 2026-12-02 session built without device time.
#  1. GPU tests: CUDA-graph decode steps bit-identical to launched ones; packed attention against each sample alone;
#     the fused decoder (its default path changed: set_step, workspace slots) against TorchSharp.
#  2. bench decode with graphs off / on, beside the compiled PyTorch decoder (issue 15's decode targets).
#  3. The real trainer on CLoT-like data, padded and packed (one call per layer now), beside perf_ref.py (issue 14).
# Carry: .gpu/app (CLI + Bench.Serve + GPU tests), .gpu/cfg, .gpu/tok, .gpu/tools, .gpu/goldens, .gpu/clot, .gpu/fixtures.tar.xz
export PYTHONUNBUFFERED=1
ROOT=$PWD; R=/tmp/res; mkdir -p $R; T0=$SECONDS
ts() { echo "[$((SECONDS - T0)) s] $*" | tee -a $R/timeline.txt; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > $R/gpu.txt
mkdir -p /tmp/app && tar xJf .gpu/app/vlmtune.tar.xz -C /tmp/app
export LD_LIBRARY_PATH=$(python3 -c 'import torch,os;print(os.path.dirname(torch.__file__))')/lib
A=/tmp/app/gpu; V=$A/vlmtune; C=.gpu/cfg/internvl2-2b.json; IVL=.gpu/goldens/internvl_chat
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
