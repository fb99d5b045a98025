#!/usr/bin/env bash
# Device call C: the real trainer (vlmtune train) on random InternVL2-2B weights: CLoT-like LoRA (padded and packed),
# the 7-tile workload, and the seed's QLoRA recipe (batch 8 x accumulation 2: issue 19's one-GPU baseline).
export PYTHONUNBUFFERED=1
R=/tmp/res; mkdir -p $R; T0=$SECONDS
left() { [ $((SECONDS - T0)) -lt $1 ]; }
mkdir -p /tmp/app && tar xJf .gpu/app/vlmtune.tar.xz -C /tmp/app
export LD_LIBRARY_PATH=$(python3 -c 'import torch,os;print(os.path.dirname(torch.__file__))')/lib
export PYTORCH_CUDA_ALLOC_CONF=backend:cudaMallocAsync
V=/tmp/app/gpu/vlmtune; C=.gpu/cfg/internvl2-2b.json
timeout 120 $V bench make-model --config $C --tokenizer-from .gpu/tok --out /tmp/m2b --device cuda > $R/make-model.txt 2>&1; tail -1 $R/make-model.txt
t() { timeout $2 $V train $1 > $R/train-$(basename $1 .yaml).log 2>&1; echo "$1 rc=$?"; grep -E "Iter\(train\)" $R/train-$(basename $1 .yaml).log | tail -3 | sed -E 's/  eta: [^ ]+//' | cut -c1-260; grep -i "adamw\|error" $R/train-$(basename $1 .yaml).log | head -3; }
t .gpu/clot/lora.yaml 100
t .gpu/long/lora7.yaml 110
left 330 && t .gpu/clot/qlora.yaml 110
left 440 && t .gpu/clot/lora_packed.yaml 100
(cd $R && tar cJf $OUT/res-c.tar.xz .)
