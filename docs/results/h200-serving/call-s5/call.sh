#!/usr/bin/env bash
# Device call S5: LoRA / QLoRA x fp32 / 8-bit AdamW states, peak memory under cudaMallocAsync (7 tiles x 1,900, batch 8);
# InternVL3.5-2B with its untied head beside the PyTorch reference (same recipe as docs/performance.md's families table).
export PYTHONUNBUFFERED=1
R=/tmp/res; mkdir -p $R; T0=$SECONDS
ts() { echo "[$((SECONDS - T0)) s] $*" | tee -a $R/timeline.txt; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > $R/gpu.txt
mkdir -p /tmp/app && tar xJf .gpu/app/vlmtune.tar.xz -C /tmp/app
export LD_LIBRARY_PATH=$(python3 -c 'import torch,os;print(os.path.dirname(torch.__file__))')/lib
export PYTORCH_CUDA_ALLOC_CONF=backend:cudaMallocAsync
V=/tmp/app/gpu/vlmtune; C=.gpu/cfg/internvl2-2b.json; C35=.gpu/cfg/internvl3_5-2b.json; IVL=.gpu/goldens/internvl_chat
b() { timeout 150 $V bench train --device cuda "$@" 2>>$R/bench-train.err | tee -a $R/bench-train.jsonl | python3 -c "
import sys, json
for l in sys.stdin:
    try: d = json.loads(l)
    except Exception: continue
    print({k: d.get(k) for k in ['mode','optim','s_per_step','tokens_per_s','peak_gpu_mem_gib','peak_gpu_mem_source','optimizer_state_mib','fused_adamw']})"; }
ts memory; b --config $C --mode lora qlora --optim adamw adamw_8bit
ts ref-3.5; timeout 150 python3 .gpu/tools/perf_ref_family.py $IVL $C35 > $R/ref-internvl3_5-2b-untied.txt 2>&1; grep -i "train\|tok" $R/ref-internvl3_5-2b-untied.txt | tail -3
ts ours-3.5; b --config $C35 --mode lora
ts done
(cd $R && tar cJf $OUT/res-s5.tar.xz .)
