#!/usr/bin/env bash
# Device call H: GPU tests; bench train (7-tile LoRA/QLoRA, CLoT-like 1 tile x 380 tokens with a phase trace, batch 8/32)
# beside the eager PyTorch reference, same machine, same call.
export PYTHONUNBUFFERED=1
ROOT=$PWD; R=/tmp/res; mkdir -p $R
( OUT=$R GPU_TESTS_TIMEOUT=200 VLMTUNE_FIXTURES=$ROOT/.gpu/fixtures.tar.xz bash tools/run_gpu_tests.sh .gpu/app/vlmtune.tar.xz > /dev/null 2>&1; echo "gpu tests rc=$?" ) | tee $R/gpu-tests-rc.txt
grep -E "Total tests|Failed|Passed:|\[FAIL\]" $R/gpu-tests.log | tail -8
mkdir -p /tmp/app && tar xJf .gpu/app/vlmtune.tar.xz -C /tmp/app
export LD_LIBRARY_PATH=$(python3 -c 'import torch,os;print(os.path.dirname(torch.__file__))')/lib
export PYTORCH_CUDA_ALLOC_CONF=backend:cudaMallocAsync
V=/tmp/app/gpu/vlmtune; C=.gpu/cfg/internvl2-2b.json; IVL=.gpu/goldens/internvl_chat
b() { timeout 120 $V bench train --config $C --device cuda "$@" 2>>$R/bench-train.err | tee -a $R/bench-train.jsonl | cut -c1-330; }
b --mode lora qlora
VLMTUNE_MEMORY_TRACE=4 b --mode lora --tiles-per-sample 1 --seq-len 380 --steps 6
b --mode lora --tiles-per-sample 1 --seq-len 380 --batch-size 32 --steps 4
b --mode lora --tiles-per-sample 1 --seq-len 380 --gradient-checkpointing false --steps 6
CUDA_LAUNCH_BLOCKING=1 VLMTUNE_MEMORY_TRACE=3 b --mode lora --tiles-per-sample 1 --seq-len 380 --steps 2 --warmup-steps 2
timeout 100 python3 .gpu/tools/perf_ref.py $IVL $C 8 1 380 > $R/ref-clot.txt 2>&1; grep train_lora $R/ref-clot.txt
timeout 120 python3 .gpu/tools/perf_ref.py $IVL $C 8 7 1900 > $R/ref-7tile.txt 2>&1; grep train_lora $R/ref-7tile.txt
(cd $R && tar cJf $OUT/res-h.tar.xz .)
