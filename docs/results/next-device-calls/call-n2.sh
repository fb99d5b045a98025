#!/usr/bin/env bash
# Device call N2: measures what the 2026-12-02 sessions built without device time. Run from the repository root.
#  1. vlmtune serve at 64 clients (7-tile image, 128 tokens): greedy, sampled (batched sampler), greedy with CUDA graphs.
#  2. The real trainer on CLoT-like data, padded and packed (one attention call per layer now), beside perf_ref.py.
# Carry: .gpu/app (CLI + Bench.Serve), .gpu/cfg, .gpu/tok, .gpu/tools, .gpu/goldens, .gpu/clot, .gpu/long
source docs/results/next-device-calls/setup.sh
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
