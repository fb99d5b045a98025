#!/usr/bin/env bash
# Next session's second device call (N2): what the 2026-12-02 session built without device time.
#  1. vlmtune serve at 64 clients (7-tile image, 128 tokens): greedy, sampled (batched sampler), greedy with CUDA graphs.
#  2. The real trainer on CLoT-like data, padded and packed (one attention call per layer now), beside perf_ref.py.
# Carry: .gpu/app (CLI + Bench.Serve + GPU tests), .gpu/cfg, .gpu/tok, .gpu/tools, .gpu/goldens, .gpu/clot, .gpu/fixtures.tar.xz
export PYTHONUNBUFFERED=1
ROOT=$PWD; R=/tmp/res; mkdir -p $R; T0=$SECONDS
ts() { echo "[$((SECONDS - T0)) s] $*" | tee -a $R/timeline.txt; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > $R/gpu.txt
mkdir -p /tmp/app && tar xJf .gpu/app/vlmtune.tar.xz -C /tmp/app
export LD_LIBRARY_PATH=$(python3 -c 'import torch,os;print(os.path.dirname(torch.__file__))')/lib
A=/tmp/app/gpu; V=$A/vlmtune; C=.gpu/cfg/internvl2-2b.json; IVL=.gpu/goldens/internvl_chat
python3 -c "from PIL import Image; Image.open('.gpu/long/dog.jpg').convert('RGB').resize((1344,896)).save('/tmp/img7.jpg', quality=95)"
ts make-model; timeout 120 $V bench make-model --config $C --tokenizer-from .gpu/tok --out /tmp/m2b --device cuda > $R/make-model.txt 2>&1; tail -1 $R/make-model.txt
S="timeout 110 $A/VlmTune.Bench.Serve --model /tmp/m2b --device cuda --clients 64 --requests-per-client 3 --max-tokens 128 --image /tmp/img7.jpg"
ts serve-greedy; $S > $R/serve-greedy.txt 2>&1; tail -2 $R/serve-greedy.txt
ts serve-sampled; $S --temperature 0.8 --top-p 0.9 > $R/serve-sampled.txt 2>&1; tail -2 $R/serve-sampled.txt
ts serve-graphs; VLMTUNE_CUDA_GRAPHS=1 $S > $R/serve-greedy-graphs.txt 2>&1; tail -2 $R/serve-greedy-graphs.txt
export PYTORCH_CUDA_ALLOC_CONF=backend:cudaMallocAsync
t() { timeout $2 $V train $1 > $R/train-$(basename $1 .yaml).log 2>&1; echo "$1 rc=$?"; grep -E "Iter\(train\)" $R/train-$(basename $1 .yaml).log | tail -3 | sed -E 's/  eta: [^ ]+//' | cut -c1-260; }
ts train-padded; t .gpu/clot/lora.yaml 90
ts train-packed; t .gpu/clot/lora_packed.yaml 90
ts ref-clot; timeout 100 python3 .gpu/tools/perf_ref.py $IVL $C 8 1 380 > $R/ref-clot.txt 2>&1; grep train_lora $R/ref-clot.txt
ts done
(cd $R && tar cJf $OUT/res-n2.tar.xz .)
