"""Checks a folder written by `vlmtune merge --layout hf` against transformers and the official InternVL code.

Runs on the GPU machine's Python (PyTorch, transformers 5.x, timm; no network). Usage:
  python3 check_hf_layout.py HF_DIR OFFICIAL_DIR IVL_CHAT_DIR IMAGE [--max-new-tokens N] [--device cpu|cuda] [--max-tiles N]
    HF_DIR:       the merged folder in the hf layout (vlmtune merge --layout hf)
    OFFICIAL_DIR: the same base + adapter merged in the official layout (vlmtune merge)
    IVL_CHAT_DIR: internvl_chat/ of a checkout of OpenGVLab/InternVL (put on sys.path, never copied)
    IMAGE:        any image; tiled with the official dynamic_preprocess + build_transform
HF_DIR is loaded with transformers.InternVLForConditionalGeneration.from_pretrained (no remote code), OFFICIAL_DIR with
the official InternVLChatModel (Qwen3 through transformers.Qwen3ForCausalLM, as the released InternVL3.5 remote code
does). Both get the same prompt ids (text, <img>, 256 <IMG_CONTEXT> per tile, </img>, text) and pixel values, in fp32.
Prints one JSON object: max |Δ logits| over every position, both greedy continuations (full recomputation, no cache),
transformers' loading report (missing / unexpected / mismatched keys) and whether AutoProcessor builds.
"""
import argparse, json, os, sys, types

parser = argparse.ArgumentParser()
parser.add_argument('hf_dir'); parser.add_argument('official_dir'); parser.add_argument('ivl_chat_dir'); parser.add_argument('image')
parser.add_argument('--max-new-tokens', type=int, default=8)
parser.add_argument('--device', default='cpu')
parser.add_argument('--max-tiles', type=int, default=6)
parser.add_argument('--prompt-ids', help='JSON file: `vlmtune chat --json` output (its prompt_ids) to use instead of the synthetic prompt')
args = parser.parse_args()

sys.modules['decord'] = types.SimpleNamespace(VideoReader=None, cpu=None)   # video only; not installed there
sys.path.insert(0, args.ivl_chat_dir)
import torch, transformers
from PIL import Image
from safetensors.torch import load_file
from internvl.model.internvl_chat import InternVLChatConfig, InternVLChatModel
from internvl.train.dataset import build_transform, dynamic_preprocess

torch.manual_seed(0)
device = torch.device(args.device)


def read_json(path):
    with open(path) as f: return json.load(f)


def official_model(d):
    """InternVLChatModel from an official folder, weights loaded strictly (a tied head is the one key it may lack)."""
    cfg = read_json(os.path.join(d, 'config.json'))
    llm = cfg['llm_config']
    if llm['architectures'][0] == 'Qwen3ForCausalLM':
        # The GitHub code stops at Qwen2; build the config with a Qwen2 stand-in, then the real Qwen3 LLM.
        stand_in = dict(llm, architectures=['Qwen2ForCausalLM'], model_type='qwen2'); stand_in.pop('head_dim', None)
        config = InternVLChatConfig(**dict(cfg, llm_config=stand_in))
        config.llm_config = transformers.Qwen3Config(**llm)
        model = InternVLChatModel(config, language_model=transformers.Qwen3ForCausalLM(config.llm_config), use_flash_attn=False)
    else:
        config = InternVLChatConfig(**cfg)
        config.llm_config.tie_word_embeddings = llm.get('tie_word_embeddings', False)
        model = InternVLChatModel(config, use_flash_attn=False)
    state = {}
    index = os.path.join(d, 'model.safetensors.index.json')
    files = sorted(set(read_json(index)['weight_map'].values())) if os.path.exists(index) else ['model.safetensors']
    for f in files: state.update(load_file(os.path.join(d, f)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if llm.get('tie_word_embeddings', False):
        model.language_model.tie_weights()
        missing = [k for k in missing if k != 'language_model.lm_head.weight']
    assert not missing and not unexpected, f'official folder does not fit: missing {missing}, unexpected {unexpected}'
    return model, cfg


def hf_model(d):
    kwargs = dict(attn_implementation='eager', output_loading_info=True)
    try: model, info = transformers.InternVLForConditionalGeneration.from_pretrained(d, dtype=torch.float32, **kwargs)
    except TypeError: model, info = transformers.InternVLForConditionalGeneration.from_pretrained(d, torch_dtype=torch.float32, **kwargs)
    return model, {k: sorted(map(str, v)) for k, v in info.items() if v}


def processor_status(d):
    try:
        transformers.AutoProcessor.from_pretrained(d)
        return 'ok'
    except Exception as e:   # reported, not fatal: the weights check does not need it
        return f'{type(e).__name__}: {e}'.splitlines()[0]


off, off_cfg = official_model(args.official_dir)
hf, loading = hf_model(args.hf_dir)
hf_cfg = read_json(os.path.join(args.hf_dir, 'config.json'))
off, hf = off.float().to(device).eval(), hf.float().to(device).eval()

size = off_cfg.get('force_image_size', 448)
tiles = dynamic_preprocess(Image.open(args.image).convert('RGB'), image_size=size, use_thumbnail=True, max_num=args.max_tiles)
transform = build_transform(is_train=False, input_size=size)
pixels = torch.stack([transform(t) for t in tiles]).to(device)
context = hf_cfg['image_token_id']
tokens_per_tile = hf_cfg.get('image_seq_length', 256)
# Every InternVL tokenizer adds <img>, </img>, <IMG_CONTEXT> in this order; the text ids are arbitrary but in every vocabulary.
ids = [11, 22, 33, context - 2] + [context] * (tokens_per_tile * len(tiles)) + [context - 1, 44, 55, 66]
if args.prompt_ids:
    ids = json.load(open(args.prompt_ids))['prompt_ids']
    assert ids.count(context) == tokens_per_tile * len(tiles), 'the prompt ids and the image disagree on the tile count'
off.img_context_token_id = context


@torch.no_grad()
def logits_official(seq):
    x = torch.tensor([seq], device=device)
    return off(pixel_values=pixels, input_ids=x, image_flags=torch.ones(len(tiles), 1, dtype=torch.long, device=device)).logits[0]


@torch.no_grad()
def logits_hf(seq):
    return hf(input_ids=torch.tensor([seq], device=device), pixel_values=pixels).logits[0]


def greedy(logits_of):
    seq = list(ids)
    for _ in range(args.max_new_tokens): seq.append(int(logits_of(seq)[-1].argmax()))
    return seq[len(ids):]


a, b = logits_official(ids).float(), logits_hf(ids).float()
head_tied = hf.lm_head.weight.data_ptr() == hf.get_input_embeddings().weight.data_ptr()
greedy_official, greedy_hf = greedy(logits_official), greedy(logits_hf)
print(json.dumps({
    'transformers': transformers.__version__,
    'prompt_tokens': len(ids), 'tiles': len(tiles),
    'max_abs_diff_logits': float((a - b).abs().max()), 'max_abs_logit': float(a.abs().max()),
    'argmax_agree': float((a.argmax(-1) == b.argmax(-1)).float().mean()),
    'greedy_official': greedy_official, 'greedy_hf': greedy_hf, 'same_greedy': greedy_official == greedy_hf,
    'hf_loading_report': loading,
    'hf_head_tied': head_tied, 'config_tie_word_embeddings': hf_cfg.get('tie_word_embeddings'),
    'processor': processor_status(args.hf_dir),
}, indent=2))
