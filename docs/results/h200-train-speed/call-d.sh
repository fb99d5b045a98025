#!/usr/bin/env bash
# Device call D: why the real trainer is slower than bench train on short samples: loader workers off, fixed-length
# samples, fewer OpenMP threads.
export PYTHONUNBUFFERED=1
R=/tmp/res; mkdir -p $R
mkdir -p /tmp/app && tar xJf .gpu/app/vlmtune.tar.xz -C /tmp/app
export LD_LIBRARY_PATH=$(python3 -c 'import torch,os;print(os.path.dirname(torch.__file__))')/lib
export PYTORCH_CUDA_ALLOC_CONF=backend:cudaMallocAsync
V=/tmp/app/gpu/vlmtune; C=.gpu/cfg/internvl2-2b.json
timeout 120 $V bench make-model --config $C --tokenizer-from .gpu/tok --out /tmp/m2b --device cuda > $R/make-model.txt 2>&1; tail -1 $R/make-model.txt
t() { timeout 90 env $3 $V train $1 > $R/$2.log 2>&1; echo "$2 rc=$?"; grep -E "Iter\(train\)" $R/$2.log | tail -3 | sed -E 's/  eta: [^ ]+//; s/.*Iter/Iter/' | cut -c1-200; }
t .gpu/clot/lora_w0.yaml workers0 X=1
t .gpu/clot/lora_fixed.yaml fixed X=1
t .gpu/clot/lora_omp.yaml omp2 OMP_NUM_THREADS=2
t .gpu/clot/lora.yaml again X=1
(cd $R && tar cJf $OUT/res-d.tar.xz .)
