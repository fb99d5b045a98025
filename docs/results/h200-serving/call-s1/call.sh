#!/usr/bin/env bash
# Device call S1 (issue 15): vlmtune serve under 1-64 streaming clients (one 7-tile image each; the same image, then
# an image of its own per request), bench decode beside the compiled PyTorch decoder; fused AdamW GPU tests.
export PYTHONUNBUFFERED=1
ROOT=$PWD; R=/tmp/res; mkdir -p $R
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > $R/gpu.txt
python3 -c 'import torch;print("torch", torch.__version__, "cuda", torch.version.cuda)' >> $R/gpu.txt
mkdir -p /tmp/app && tar xJf .gpu/app/vlmtune.tar.xz -C /tmp/app
export LD_LIBRARY_PATH=$(python3 -c 'import torch,os;print(os.path.dirname(torch.__file__))')/lib
A=/tmp/app/gpu; V=$A/vlmtune; C=.gpu/cfg/internvl2-2b.json
t0=$(date +%s); ts() { echo "[$(( $(date +%s) - t0 )) s] $*" | tee -a $R/timeline.txt; }
ts make-model
$V bench make-model --config $C --tokenizer-from .gpu/tok --out /tmp/m2b --device cuda > $R/make-model.txt 2>&1
python3 -c "from PIL import Image; Image.open('.gpu/long/dog.jpg').convert('RGB').resize((1344,896)).save('/tmp/img7.jpg', quality=95)"
S="$A/VlmTune.Bench.Serve --model /tmp/m2b --device cuda --clients 1,8,32,64 --requests-per-client 3 --max-tokens 128 --image /tmp/img7.jpg"
ts serve-same; timeout 170 $S > $R/serve-same-image.txt 2>&1; tail -6 $R/serve-same-image.txt
ts serve-distinct; timeout 170 $S --distinct-images 1 > $R/serve-distinct-images.txt 2>&1; tail -6 $R/serve-distinct-images.txt
ts bench-decode; timeout 120 $V bench decode --config $C --device cuda --batch 1 8 32 64 --prompt-tokens 3400 --tiles 13 --new-tokens 128 --warmup 8 > $R/bench-decode.jsonl 2>$R/bench-decode.err; cut -c1-200 $R/bench-decode.jsonl
ts gpu-tests; ( OUT=$R bash tools/run_gpu_tests.sh $A -class VlmTune.Gpu.Tests.FusedAdamWTests > /dev/null 2>&1; echo "gpu tests rc=$?" ) > $R/gpu-tests-rc.txt; cat $R/gpu-tests-rc.txt
ts decode-ref; timeout 150 python3 .gpu/tools/decode_ref_compiled.py 1 8 32 64 > $R/decode-ref.txt 2>&1; tail -5 $R/decode-ref.txt
ts done
(cd $R && tar cJf $OUT/res-s1.tar.xz .)
