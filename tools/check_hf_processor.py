"""Does transformers' AutoProcessor build from `vlmtune merge --layout hf` folders, render the same chat template as the
tokenizer, and give the prompt ids `vlmtune chat` gives and the official code's tiles? Runs on the GPU machine's Python
(transformers 5.x, PIL; no network) from the repository root, with the files this machine prepared under .gpu/hf:
  .gpu/hf/{qwen2,qwen3}-hf/             vlmtune merge --layout hf of tests/fixtures/families/<v> (+ the shared Qwen vocab)
  .gpu/hf/ours-<v>-<image>.json         vlmtune chat --model .gpu/hf/<v>-hf --image .gpu/hf/<image> --prompt
                                        "Describe the picture." --max-new-tokens 1 --json
  .gpu/hf/{wide,tiny}.png               the shared fixture images
  .gpu/goldens/internvl_chat/           internvl_chat/ of OpenGVLab/InternVL (dynamic_preprocess, build_transform)
Writes $OUT/autoprocessor-check.json (docs/results/h200-families/autoprocessor-check.json)."""
import json, sys, os, shutil, types
sys.modules['decord'] = types.SimpleNamespace(VideoReader=None, cpu=None)
sys.path.insert(0, '.gpu/goldens/internvl_chat')
import torch, transformers
from PIL import Image
from transformers import AutoProcessor
from internvl.train.dataset import build_transform, dynamic_preprocess

def check(d, v, img):
    ours = json.load(open(f'.gpu/hf/ours-{v}-{img}.json'))
    r = {}
    try:
        proc = AutoProcessor.from_pretrained(d)
        r['processor'] = type(proc).__name__
        r['len_tokenizer'] = len(proc.tokenizer)
        r['video_token'] = [getattr(proc.tokenizer, 'video_token', None), proc.tokenizer.convert_tokens_to_ids('<video>')]
        messages = [{'role': 'user', 'content': [{'type': 'image'}, {'type': 'text', 'text': 'Describe the picture.'}]}]
        text = proc.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        try: r['processor_chat_template_same'] = proc.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == text
        except Exception as e: r['processor_chat_template'] = repr(e)[:200]
        image = Image.open(f'.gpu/hf/{img}').convert('RGB')
        inputs = proc(text=text, images=[image], return_tensors='pt')
        ids = inputs['input_ids'][0].tolist()
        r['prompt_ids_equal'] = ids == ours['prompt_ids']
        r['prompt_tokens'] = [len(ids), len(ours['prompt_ids'])]
        if not r['prompt_ids_equal']:
            i = next((k for k, (a, b) in enumerate(zip(ids, ours['prompt_ids'])) if a != b), min(len(ids), len(ours['prompt_ids'])))
            r['first_difference'] = [i, ids[max(0, i - 3):i + 5], ours['prompt_ids'][max(0, i - 3):i + 5]]
        pv = inputs['pixel_values'].float()
        tiles = dynamic_preprocess(image, min_num=1, max_num=12, image_size=448, use_thumbnail=True)
        t = build_transform(is_train=False, input_size=448)
        official = torch.stack([t(x) for x in tiles])
        r['tiles'] = {'processor': pv.shape[0], 'vlmtune': ours['tiles'], 'official': official.shape[0]}
        if official.shape == pv.shape: r['pixels_max_abs_diff_vs_official'] = round(float((official - pv).abs().max()), 4)
    except Exception as e:
        r['error'] = repr(e)[:400]
    return r

res = {'transformers': transformers.__version__}
for v in ['qwen2', 'qwen3']:
    for img in ['wide.png', 'tiny.png']:
        r = check(f'.gpu/hf/{v}-hf', v, img)
        if img == 'wide.png':   # the same folder without the video token: does the processor need it, and what does it add?
            alt = f'/tmp/{v}-novideo'; shutil.rmtree(alt, ignore_errors=True); shutil.copytree(f'.gpu/hf/{v}-hf', alt)
            tc = json.load(open(f'{alt}/tokenizer_config.json')); tc['extra_special_tokens'].pop('video_token', None)
            json.dump(tc, open(f'{alt}/tokenizer_config.json', 'w'), ensure_ascii=False)
            r['without_video_token'] = check(alt, v, img)
        res[f'{v}-{img}'] = r
print(json.dumps(res, indent=1))
json.dump(res, open(os.environ['OUT'] + '/autoprocessor-check.json', 'w'), indent=1)
