#!/usr/bin/env bash
# Device call S2: every GPU test (Phi-3 fused decoding, 8-bit AdamW kernel, the rest); vlmtune serve under 1-64
# streaming clients with the prefill scheduler fixed (same image / an image of its own per request); bench train
# LoRA / QLoRA with 32-bit and 8-bit AdamW states (7 tiles x 1,900 tokens, batch 8).
export PYTHONUNBUFFERED=1
ROOT=$PWD; R=/tmp/res; mkdir -p $R
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > $R/gpu.txt
mkdir -p /tmp/app && tar xJf .gpu/app/vlmtune.tar.xz -C /tmp/app
export LD_LIBRARY_PATH=$(python3 -c 'import torch,os;print(os.path.dirname(torch.__file__))')/lib
A=/tmp/app/gpu; V=$A/vlmtune; C=.gpu/cfg/internvl2-2b.json
t0=$(date +%s); ts() { echo "[$(( $(date +%s) - t0 )) s] $*" | tee -a $R/timeline.txt; }
ts gpu-tests
( OUT=$R GPU_TESTS_TIMEOUT=230 VLMTUNE_FIXTURES=$ROOT/.gpu/fixtures.tar.xz bash tools/run_gpu_tests.sh $A > /dev/null 2>&1; echo "gpu tests rc=$?" ) > $R/gpu-tests-rc.txt
cat $R/gpu-tests-rc.txt; grep -E "Total tests|Failed:|\[FAIL\]" $R/gpu-tests.log | tail -12
ts make-model
$V bench make-model --config $C --tokenizer-from .gpu/tok --out /tmp/m2b --device cuda > $R/make-model.txt 2>&1
python3 -c "from PIL import Image; Image.open('.gpu/long/dog.jpg').convert('RGB').resize((1344,896)).save('/tmp/img7.jpg', quality=95)"
S="$A/VlmTune.Bench.Serve --model /tmp/m2b --device cuda --clients 1,8,32,64 --requests-per-client 3 --max-tokens 128 --image /tmp/img7.jpg"
ts serve-same; timeout 150 $S > $R/serve-same-image.txt 2>&1; grep -v "^fail\|^   at" $R/serve-same-image.txt | tail -7 | cut -c1-220
ts serve-distinct; timeout 150 $S --distinct-images 1 > $R/serve-distinct-images.txt 2>&1; grep -v "^fail\|^   at" $R/serve-distinct-images.txt | tail -6 | cut -c1-220
ts bench-train
b() { timeout 100 $V bench train --config $C --device cuda "$@" 2>>$R/bench-train.err | tee -a $R/bench-train.jsonl | cut -c1-400; }
b --mode lora qlora --optim adamw adamw_8bit
ts done
(cd $R && tar cJf $OUT/res-s2.tar.xz .)
