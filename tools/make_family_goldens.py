"""Golden fixtures for the InternVL LLM families (Qwen2, Qwen3, Llama, Phi-3), computed with the official InternVL code.

Runs on the GPU machine's Python (PyTorch, transformers, peft, timm); extends shared/tools/make_golden.py to the other
families. Usage:
  python3 make_family_goldens.py IVL_CHAT_DIR FIXTURES_DIR OUT_DIR [VARIANT ...]
    IVL_CHAT_DIR: internvl_chat/ of a checkout of OpenGVLab/InternVL (run, never copied)
    FIXTURES_DIR: shared/fixtures (tokenizers/, tiny-internvl2/images/)
Writes OUT_DIR/VARIANT/{model/, adapter/, golden.json, golden.safetensors}. model/ holds the weights, config.json and the
small tokenizer files; the large ones (vocab.json + merges.txt, tokenizer.model) are derived from shared/fixtures/tokenizers
at test time (tests/VlmTune.Tests/Support/FamilyFixtures.cs), exactly as tokenizer_folder() below writes them.

Every case starts from a fresh model state (the official dynamic-NTK rotary is stateful); greedy ids come from full
recomputation without a cache, in fp32 on the bf16-stored weights, with each step's top-2 margin recorded.
"""
import json, os, sys, types, shutil, random
import numpy as np

ivl_dir, fix_dir, out_root = sys.argv[1], sys.argv[2], sys.argv[3]
only = sys.argv[4:]
sys.modules['decord'] = types.SimpleNamespace(VideoReader=None, cpu=None)
sys.path.insert(0, ivl_dir)
import torch, transformers
from PIL import Image
from safetensors.torch import save_file
from internvl.model.internvl_chat import InternVLChatConfig, InternVLChatModel
from internvl.train.dataset import build_transform, dynamic_preprocess, preprocess_mpt, preprocess_phi3, preprocess_internvl2_5
from internvl.conversation import get_conv_template

INTERNVL_TOKENS = ['<img>', '</img>', '<IMG_CONTEXT>', '<quad>', '</quad>', '<ref>', '</ref>', '<box>', '</box>']
PREPROCESS = {'Hermes-2': preprocess_mpt, 'phi3-chat': preprocess_phi3, 'internvl2_5': preprocess_internvl2_5}
# Phi-3-mini's added tokens (32000…32010), before InternVL's.
PHI3_TOKENS = [('<|endoftext|>', True), ('<|assistant|>', True), ('<|placeholder1|>', True), ('<|placeholder2|>', True),
               ('<|placeholder3|>', True), ('<|placeholder4|>', True), ('<|system|>', True), ('<|end|>', True),
               ('<|placeholder5|>', True), ('<|placeholder6|>', True), ('<|user|>', True)]

# Tiny shapes; together they cover 1, 2 (the InternLM2 fixture), 3, 4, 6 and 8 query heads per KV head.
VARIANTS = {
    # InternVL3 / 2.5: Qwen2.5 LLM (q/k/v biases, untied head), internvl2_5 template, InternViT-300M.
    'qwen2': dict(arch='Qwen2ForCausalLM', model_type='qwen2', tok='qwen2.5', template='internvl2_5', vit='300m',
                  hidden=16, layers=2, heads=2, kv=2, inter=48, tie=False, rope_theta=1000000.0, maxpos=32768, eps=1e-6),
    # InternVL3.5: Qwen3 LLM (q/k norms, head_dim != hidden/heads, tied embeddings), internvl2_5 template.
    'qwen3': dict(arch='Qwen3ForCausalLM', model_type='qwen3', tok='qwen3', template='internvl2_5', vit='300m',
                  hidden=16, layers=2, heads=8, kv=1, head_dim=8, inter=48, tie=True, rope_theta=1000000.0, maxpos=40960, eps=1e-6),
    # InternVL2-40B / 76B style: Llama LLM with ChatML tokens (Hermes-2), InternViT-6B (RMSNorm, q/k norm, no qkv bias).
    'llama': dict(arch='LlamaForCausalLM', model_type='llama', tok='llama-chatml', template='Hermes-2', vit='6b',
                  hidden=48, layers=2, heads=6, kv=2, inter=96, tie=False, rope_theta=5000000.0, maxpos=4096, eps=1e-5),
    'llama_g6': dict(arch='LlamaForCausalLM', model_type='llama', tok='llama-chatml', template='Hermes-2', vit='300m',
                     hidden=48, layers=1, heads=6, kv=1, inter=64, tie=False, rope_theta=10000.0, maxpos=4096, eps=1e-5),
    # InternVL2-4B: Phi-3-mini-128k (fused qkv / gate_up, longrope), phi3-chat template.
    'phi3': dict(arch='Phi3ForCausalLM', model_type='phi3', tok='phi3', template='phi3-chat', vit='300m',
                 hidden=64, layers=2, heads=8, kv=2, inter=96, tie=False, rope_theta=10000.0, maxpos=2048, orig_maxpos=256, eps=1e-5),
}


def finite(x):
    """JSON has no NaN: a loss over a sample with no supervised token is written as null."""
    if isinstance(x, float) and not np.isfinite(x): return None
    if isinstance(x, dict): return {k: finite(v) for k, v in x.items()}
    if isinstance(x, list): return [finite(v) for v in x]
    return x


def write_json(path, obj):
    with open(path, 'w') as f: json.dump(finite(obj), f, indent=2, ensure_ascii=False)


def tokenizer_folder(kind, d):
    """An InternVL-style tokenizer folder; returns the small files (to keep) and the vocabulary size to use."""
    os.makedirs(d, exist_ok=True)
    added = []   # (content, id, special)
    if kind in ('qwen2.5', 'qwen3'):
        tj = json.load(open(os.path.join(fix_dir, 'tokenizers', 'qwen3', 'tokenizer.json')))
        write_json(os.path.join(d, 'vocab.json'), tj['model']['vocab'])
        with open(os.path.join(d, 'merges.txt'), 'w', encoding='utf-8') as f:
            f.write('#version: 0.2\n')
            for m in tj['model']['merges']: f.write((m if isinstance(m, str) else ' '.join(m)) + '\n')
        base = [a for a in tj['added_tokens'] if a['id'] <= (151664 if kind == 'qwen2.5' else 151668)]
        added = [(a['content'], a['id'], a['special']) for a in base]
        nxt = max(a['id'] for a in base) + 1
        added += [(t, nxt + i, True) for i, t in enumerate(INTERNVL_TOKENS)]
        specials = [a[0] for a in added if a[2] and a[0] != '<|endoftext|>']
        config = dict(add_bos_token=False, add_prefix_space=False, bos_token=None, clean_up_tokenization_spaces=False,
                      eos_token='<|im_end|>', errors='replace', model_max_length=32768, pad_token='<|endoftext|>',
                      split_special_tokens=False, tokenizer_class='Qwen2Tokenizer', unk_token=None,
                      additional_special_tokens=specials)
        special_map = dict(additional_special_tokens=specials, eos_token='<|im_end|>', pad_token='<|endoftext|>')
        vocab = 151674 if kind == 'qwen2.5' else 151936
    else:
        shutil.copy(os.path.join(fix_dir, 'tokenizers', 'llama2', 'tokenizer.model'), os.path.join(d, 'tokenizer.model'))
        extra = [('<|im_start|>', True), ('<|im_end|>', True)] if kind == 'llama-chatml' else PHI3_TOKENS
        extra += [(t, True) for t in INTERNVL_TOKENS]
        added = [(t, 32000 + i, s) for i, (t, s) in enumerate(extra)]
        eos = '<|im_end|>' if kind == 'llama-chatml' else '<|endoftext|>'
        specials = [a[0] for a in added]
        config = dict(add_bos_token=True, add_eos_token=False, bos_token='<s>', clean_up_tokenization_spaces=False,
                      eos_token='</s>' if kind == 'llama-chatml' else eos, legacy=kind == 'llama-chatml',
                      model_max_length=4096, pad_token='</s>' if kind == 'llama-chatml' else eos, sp_model_kwargs={},
                      spaces_between_special_tokens=False, tokenizer_class='LlamaTokenizer', unk_token='<unk>',
                      use_default_system_prompt=False, additional_special_tokens=specials)
        special_map = dict(additional_special_tokens=specials, bos_token='<s>', eos_token=config['eos_token'],
                           pad_token=config['pad_token'], unk_token='<unk>')
        vocab = 32000 + len(added) + 3   # a few padded rows, as released vocab sizes are
        base_decoder = {0: '<unk>', 1: '<s>', 2: '</s>'}
    decoder = {}
    if kind not in ('qwen2.5', 'qwen3'):
        for i, c in base_decoder.items():
            decoder[str(i)] = dict(content=c, lstrip=False, normalized=False, rstrip=False, single_word=False, special=True)
    for c, i, s in added:
        decoder[str(i)] = dict(content=c, lstrip=False, normalized=False, rstrip=False, single_word=False, special=s)
    config['added_tokens_decoder'] = decoder
    write_json(os.path.join(d, 'tokenizer_config.json'), config)
    write_json(os.path.join(d, 'added_tokens.json'), {c: i for c, i, _ in added})
    write_json(os.path.join(d, 'special_tokens_map.json'), special_map)
    return ['tokenizer_config.json', 'added_tokens.json', 'special_tokens_map.json'], vocab


def vision_config(kind):
    common = dict(architectures=['InternVisionModel'], model_type='intern_vit_6b', hidden_size=64, num_hidden_layers=2,
                  num_attention_heads=4, intermediate_size=128, image_size=448, patch_size=14, num_channels=3,
                  hidden_act='gelu', layer_norm_eps=1e-6, dropout=0.0, attention_dropout=0.0, drop_path_rate=0.0,
                  initializer_factor=1.0, initializer_range=0.02, use_flash_attn=False)
    if kind == '6b': return dict(common, norm_type='rms_norm', qk_normalization=True, qkv_bias=False)
    return dict(common, norm_type='layer_norm', qk_normalization=False, qkv_bias=True)


def llm_config(v, vocab, tok):
    c = dict(architectures=[v['arch']], model_type=v['model_type'], hidden_size=v['hidden'], num_hidden_layers=v['layers'],
             num_attention_heads=v['heads'], num_key_value_heads=v['kv'], intermediate_size=v['inter'], vocab_size=vocab,
             hidden_act='silu', rms_norm_eps=v['eps'], rope_theta=v['rope_theta'], max_position_embeddings=v['maxpos'],
             tie_word_embeddings=v['tie'], attn_implementation='eager', torch_dtype='bfloat16', use_cache=True,
             initializer_range=0.02, attention_dropout=0.0,
             bos_token_id=tok.bos_token_id if tok.bos_token_id is not None else 151643,
             eos_token_id=tok.convert_tokens_to_ids(tok.eos_token))
    if v['model_type'] in ('qwen2', 'qwen3'):
        c.update(use_sliding_window=False, sliding_window=v['maxpos'], max_window_layers=v['layers'])
    if v['model_type'] == 'qwen3':
        c.update(head_dim=v['head_dim'], attention_bias=False)
    if v['model_type'] == 'llama':
        c.update(attention_bias=False, mlp_bias=False, pretraining_tp=1, rope_scaling=None)
    if v['model_type'] == 'phi3':
        half = v['hidden'] // v['heads'] // 2
        rs = np.random.RandomState(7)
        c.update(original_max_position_embeddings=v['orig_maxpos'], resid_pdrop=0.0, embd_pdrop=0.0,
                 rope_scaling=dict(type='su', short_factor=[float(round(1 + 0.1 * x, 4)) for x in rs.rand(half)],
                                   long_factor=[float(round(1 + 3 * x, 4)) for x in rs.rand(half)]),
                 sliding_window=None, pad_token_id=tok.pad_token_id)   # full attention, as VlmTune computes
    return c


def build(v, cfg, tok):
    cfg_in = json.loads(json.dumps(cfg))
    real_llm = cfg_in['llm_config']
    if v['model_type'] == 'qwen3':
        # The GitHub code stops at Qwen2; the released InternVL3.5 remote code builds a Qwen3ForCausalLM (notes in shared/).
        stand_in = dict(real_llm, architectures=['Qwen2ForCausalLM'], model_type='qwen2')
        stand_in.pop('head_dim', None)
        config = InternVLChatConfig(**dict(cfg_in, llm_config=stand_in))
        config.llm_config = transformers.Qwen3Config(**real_llm)
        lm = transformers.Qwen3ForCausalLM(config.llm_config)
        model = InternVLChatModel(config, language_model=lm, use_flash_attn=False)
    else:
        config = InternVLChatConfig(**cfg_in)
        config.llm_config.tie_word_embeddings = v['tie']
        model = InternVLChatModel(config, use_flash_attn=False)
    return model


def fresh_rotary(m):
    for mod in m.modules():
        if hasattr(mod, 'inv_freq') and hasattr(mod, 'base') and hasattr(mod, '_set_cos_sin_cache'):
            mod.inv_freq = 1.0 / (mod.base ** (torch.arange(0, mod.dim, 2).float() / mod.dim))
            mod._set_cos_sin_cache(seq_len=mod.max_position_embeddings, device=mod.inv_freq.device, dtype=torch.get_default_dtype())


def make(name, v, seed):
    torch.manual_seed(seed); np.random.seed(seed); random.seed(seed)
    out = os.path.join(out_root, name); mdir = os.path.join(out, 'model')
    shutil.rmtree(out, ignore_errors=True); os.makedirs(mdir)
    tdir = os.path.join(out, '_tok')
    keep, vocab = tokenizer_folder(v['tok'], tdir)
    tok = transformers.AutoTokenizer.from_pretrained(tdir, trust_remote_code=False)
    cfg = dict(architectures=['InternVLChatModel'], model_type='internvl_chat', template=v['template'],
               vision_config=vision_config(v['vit']), llm_config=llm_config(v, vocab, tok), downsample_ratio=0.5,
               dynamic_image_size=True, force_image_size=448, max_dynamic_patch=12, min_dynamic_patch=1,
               ps_version='v2', select_layer=-1, use_thumbnail=True, use_backbone_lora=0, use_llm_lora=0,
               torch_dtype='bfloat16', pad2square=False)
    model = build(v, cfg, tok)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith('norm.weight') or 'norm1.weight' in n or 'norm2.weight' in n or n.startswith('mlp1.0.weight') or n.endswith('layernorm.weight'):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif '.ls1' in n or '.ls2' in n:
                p.copy_(0.5 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.05 * torch.randn_like(p))
    model = model.to(torch.bfloat16)
    sd = {k: t.contiguous() for k, t in model.state_dict().items()}
    if v['tie']:
        assert sd['language_model.lm_head.weight'].data_ptr() == sd['language_model.model.embed_tokens.weight'].data_ptr()
        del sd['language_model.lm_head.weight']   # as save_pretrained writes a tied checkpoint
    save_file(sd, os.path.join(mdir, 'model.safetensors'), metadata={'format': 'pt'})
    write_json(os.path.join(mdir, 'config.json'), cfg)
    for fn in keep: shutil.copy(os.path.join(tdir, fn), os.path.join(mdir, fn))
    eos_id = tok.convert_tokens_to_ids(get_conv_template(v['template']).sep.strip())
    write_json(os.path.join(mdir, 'generation_config.json'), dict(eos_token_id=[eos_id], _from_model_config=True))
    # A fresh fp32 model with the bf16-rounded weights: `.to(bfloat16)` above also rounded the rotary `inv_freq`
    # buffers, which a real bf16 checkpoint never stores (they are recomputed in fp32 at load).
    stored = {k: t.float() for k, t in sd.items()}
    model = build(v, cfg, tok).float()
    missing, unexpected = model.load_state_dict(stored, strict=False)
    assert not unexpected and all(k == 'language_model.lm_head.weight' for k in missing), (missing, unexpected)
    model = model.eval()
    model.img_context_token_id = tok.convert_tokens_to_ids('<IMG_CONTEXT>')

    transform = build_transform(is_train=False, input_size=448)
    idir = os.path.join(fix_dir, 'tiny-internvl2', 'images')
    def load_pixels(fn, max_num=12):
        image = Image.open(os.path.join(idir, fn)).convert('RGB')
        return torch.stack([transform(t) for t in dynamic_preprocess(image, image_size=448, use_thumbnail=True, max_num=max_num)])
    images = {'clot': 'clot.jpg', 'tie': 'tie.png', 'tiny': 'tiny.png'}
    pixels = {k: load_pixels(f) for k, f in images.items()}
    golden, meta = {}, dict(variant=name, seed=seed, template=v['template'], images=images, cases={},
                            eos_id=eos_id, img_context_id=model.img_context_token_id, system=model.system_message)
    with torch.no_grad():
        for k, pv in pixels.items():   # the projector's output per image: tells the vision side from the LLM
            golden[f'vit_features.{k}'] = model.extract_feature(pv).contiguous()

    def chat_case(key, img_names, question, history=None, max_new=10):
        fresh_rotary(model)
        pvs = [pixels[n] for n in img_names]
        pixel_values = torch.cat(pvs) if pvs else None
        template = get_conv_template(v['template']); template.system_message = model.system_message
        for q, a in (history or []):
            template.append_message(template.roles[0], q); template.append_message(template.roles[1], a)
        q = question
        if pvs and not history and '<image>' not in q: q = '<image>\n' + q   # as the official chat()
        template.append_message(template.roles[0], q); template.append_message(template.roles[1], None)
        query = template.get_prompt()
        for p in pvs:
            query = query.replace('<image>', '<img>' + '<IMG_CONTEXT>' * model.num_image_token * p.shape[0] + '</img>', 1)
        ids = tok(query, return_tensors='pt').input_ids
        greedy, margins = [], []
        with torch.no_grad():
            vit_embeds = model.extract_feature(pixel_values) if pixel_values is not None else None
            cur = ids
            for step in range(max_new):
                emb = model.language_model.get_input_embeddings()(cur).clone()
                if vit_embeds is not None:
                    sel = cur[0] == model.img_context_token_id
                    emb[0, sel] = vit_embeds.reshape(-1, emb.shape[-1]).to(emb.dtype)
                logits = model.language_model(inputs_embeds=emb, use_cache=False).logits[0].float()
                if step == 0:
                    golden[f'logits_last.{key}'] = logits[-1:].contiguous()
                    golden[f'lse.{key}'] = torch.logsumexp(logits, -1).contiguous()
                    golden[f'argmax.{key}'] = logits.argmax(-1).to(torch.int64).contiguous()
                top = logits[-1].topk(2)
                margins.append(float(top.values[0] - top.values[1]))
                nxt = int(top.indices[0]); greedy.append(nxt)
                if nxt == eos_id: break
                cur = torch.cat([cur, torch.tensor([[nxt]])], 1)
        meta['cases'][key] = dict(images=img_names, question=question, history=history or [], prompt=query if len(query) < 400 else None,
                                  prompt_ids=ids[0].tolist(), greedy_ids=greedy, margins=margins)

    chat_case('one_image', ['clot'], '请你根据这张图片,讲一个脑洞大开的梗。')
    chat_case('text_only', [], 'Hello, who are you? 123 emoji 😀')
    chat_case('two_images', ['tie', 'tiny'], 'Image-1: <image>\nImage-2: <image>\nCompare them.')
    chat_case('multi_turn', ['tiny'], 'And the colours?', history=[('<image>\nWhat is this?', 'A test pattern.')])
    if v['model_type'] == 'phi3':   # past original_max_position_embeddings: the long factors
        chat_case('long_text', [], ' '.join(['long context'] * 150), max_new=4)

    # training sample: the official preprocessing of this template, loss, LoRA grads (official targets), merge
    conv = [{'from': 'human', 'value': '<image>\n请你根据这张图片,讲一个脑洞大开的梗。'}, {'from': 'gpt', 'value': '『住手!现在的你还不是那家伙的对手!先撤吧!!'},
            {'from': 'human', 'value': 'Another one?'}, {'from': 'gpt', 'value': 'Sure: 2 + 2 = 5.'}]
    pv = pixels['clot']
    tok.model_max_length = 4096
    fresh_rotary(model)
    ret = PREPROCESS[v['template']](v['template'], [json.loads(json.dumps(conv))], tok, [model.num_image_token * pv.shape[0]],
                                    group_by_length=True, ds_name='golden')
    input_ids, labels = ret['input_ids'], ret['labels']
    meta['train_sample'] = dict(conversations=conv, image='clot', input_ids=input_ids[0].tolist(), labels=labels[0].tolist())
    image_flags = torch.ones(pv.shape[0], 1, dtype=torch.long)
    # InternVL's Phi-3 copy predates transformers 5's cache API; without a cache the forward is the same.
    model.language_model.config.use_cache = False
    with torch.no_grad():
        o = model(pixel_values=pv, input_ids=input_ids, attention_mask=torch.ones_like(input_ids), image_flags=image_flags, labels=labels, return_dict=True)
    meta['train_sample']['loss'] = float(o.loss)

    from peft import LoraConfig, get_peft_model
    arch = v['arch']
    targets = (['mlp.down_proj', 'mlp.gate_up_proj', 'self_attn.o_proj', 'self_attn.qkv_proj'] if arch == 'Phi3ForCausalLM' else
               ['self_attn.q_proj', 'self_attn.k_proj', 'self_attn.v_proj', 'self_attn.o_proj', 'mlp.gate_proj', 'mlp.down_proj', 'mlp.up_proj'])
    lcfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, task_type='CAUSAL_LM', target_modules=targets)
    model.language_model = get_peft_model(model.language_model, lcfg)
    with torch.no_grad():
        for n, p in model.language_model.named_parameters():
            if 'lora_' in n: p.copy_(0.05 * torch.randn_like(p))
    for n, p in model.named_parameters(): p.requires_grad = 'lora_' in n
    model.language_model.enable_input_require_grads()
    fresh_rotary(model)
    o = model(pixel_values=pv, input_ids=input_ids, attention_mask=torch.ones_like(input_ids), image_flags=image_flags, labels=labels, return_dict=True)
    o.loss.backward()
    meta['lora'] = dict(r=4, alpha=8, targets=targets, loss=float(o.loss), grad_norms={})
    for n, p in model.language_model.named_parameters():
        if 'lora_' in n:
            meta['lora']['grad_norms'][n] = float(p.grad.norm())
            golden['lora_grad.' + n] = p.grad.contiguous()
    adir = os.path.join(out, 'adapter'); model.language_model.save_pretrained(adir)
    merged = model.language_model.merge_and_unload()
    fresh_rotary(merged)
    with torch.no_grad():
        emb = merged.get_input_embeddings()(input_ids).clone()
        sel = input_ids[0] == model.img_context_token_id
        emb[0, sel] = model.extract_feature(pv).reshape(-1, emb.shape[-1])
        ml = merged(inputs_embeds=emb, use_cache=False).logits[0].float()
    golden['merged_lse'] = torch.logsumexp(ml, -1).contiguous()
    golden['merged_logits_last'] = ml[-1:].contiguous()
    save_file({k: t.detach().contiguous() for k, t in golden.items()}, os.path.join(out, 'golden.safetensors'))
    write_json(os.path.join(out, 'golden.json'), meta)
    shutil.rmtree(tdir)
    print('GOLDEN OK', name, {k: tuple(t.shape) for k, t in golden.items() if not k.startswith('lora_grad')})


failed = []
for i, (name, v) in enumerate(VARIANTS.items()):
    if not only or name in only:
        try:
            make(name, v, seed=100 + i)
        except Exception:
            import traceback; traceback.print_exc(); failed.append(name)
print('FAILED', failed) if failed else print('ALL GOLDENS OK')
