#!/usr/bin/env bash
# Device call B2: the fused AdamW GPU tests; bench train (CLoT-like and 7-tile, fused AdamW on/off) beside the eager and
# tuned PyTorch references in the same call; the real trainer on CLoT-like data (LoRA, and QLoRA with the seed's batch 8
# x accumulation 2: issue 19's one-GPU baseline).
export PYTHONUNBUFFERED=1
ROOT=$PWD; R=/tmp/res; mkdir -p $R; T0=$SECONDS
left() { [ $((SECONDS - T0)) -lt $1 ]; }   # run a step only while the call has time
OUT=$R GPU_TESTS_TIMEOUT=120 bash tools/run_gpu_tests.sh .gpu/app/vlmtune.tar.xz -class VlmTune.Gpu.Tests.FusedAdamWTests > /dev/null 2>&1; echo "adamw tests rc=$?" | tee $R/adamw-tests-rc.txt
grep -E "Total:|\[FAIL\]" $R/gpu-tests.log | tail -6
mkdir -p /tmp/app && tar xJf .gpu/app/vlmtune.tar.xz -C /tmp/app
export LD_LIBRARY_PATH=$(python3 -c 'import torch,os;print(os.path.dirname(torch.__file__))')/lib
export PYTORCH_CUDA_ALLOC_CONF=backend:cudaMallocAsync
V=/tmp/app/gpu/vlmtune; C=.gpu/cfg/internvl2-2b.json; IVL=.gpu/goldens/internvl_chat
b() { timeout 100 $V bench train --config $C --device cuda "$@" 2>>$R/bench-train.err | tee -a $R/bench-train.jsonl | cut -c1-250; }
ref() { timeout 110 python3 .gpu/tools/$1 $IVL $C "${@:2}" > $R/ref-$1-$4.txt 2>&1; grep train_lora $R/ref-$1-$4.txt; }
VLMTUNE_MEMORY_TRACE=5 b --workload clot --mode lora --steps 10
ref perf_ref.py 8 1 380
ref perf_ref_tuned.py 8 1 380
VLMTUNE_FUSED_ADAMW=0 b --workload clot --mode lora --steps 10
b --mode lora qlora
ref perf_ref.py 8 7 1900
left 330 && ref perf_ref_tuned.py 8 7 1900
left 380 && VLMTUNE_FUSED_ADAMW=0 b --mode lora
if left 420; then
  timeout 60 $V bench make-model --config $C --tokenizer-from .gpu/tok --out /tmp/m2b > $R/make-model.txt 2>&1
  timeout 70 $V train .gpu/clot/lora.yaml > $R/train-lora.log 2>&1; grep -E "Iter\(train\)" $R/train-lora.log | tail -2 | cut -c1-300
fi
left 510 && { timeout 75 $V train .gpu/clot/qlora.yaml > $R/train-qlora.log 2>&1; grep -E "Iter\(train\)" $R/train-qlora.log | tail -2 | cut -c1-300; }
(cd $R && tar cJf $OUT/res-b2.tar.xz .)
