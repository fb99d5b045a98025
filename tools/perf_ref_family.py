"""PyTorch reference throughput for LoRA fine-tuning and decoding of the other InternVL families (random weights), the
same recipe as shared/tools/perf_ref.py (which covers InternVL2-2B): the official InternVL chat model with the config's
own LLM class (transformers' Qwen2ForCausalLM / Qwen3ForCausalLM, SDPA attention), LoRA r=128/alpha=256 on the official
wrap_llm_lora targets plus an untied output head, mlp1 trainable, ViT frozen, LLM gradient checkpointing, bf16, AdamW.
The image-context id is the vocabulary's last id, as `vlmtune bench` uses for random-weight models.
Usage: python3 perf_ref_family.py IVL_CODE_DIR CONFIG_JSON [BATCH TILES SEQ] [--decode-only]"""
import sys, time, json, types
sys.modules['decord'] = types.SimpleNamespace(VideoReader=None, cpu=None)
sys.path.insert(0, sys.argv[1])
import torch, transformers
from internvl.model.internvl_chat import InternVLChatConfig, InternVLChatModel
from peft import LoraConfig, get_peft_model
cfg = json.load(open(sys.argv[2]))
decode_only = '--decode-only' in sys.argv   # skip the training figure (a decode-only comparison call)
argv = [a for a in sys.argv if a != '--decode-only']
B, T, S = (int(x) for x in (argv[3:6] if len(argv) > 5 else (8, 7, 1900)))
llm = dict(cfg['llm_config'], attn_implementation='sdpa', torch_dtype='bfloat16')
arch = llm['architectures'][0]
cfg['vision_config']['use_flash_attn'] = False
torch.manual_seed(0)
with torch.device('cuda'):
    if arch == 'Qwen3ForCausalLM':   # as the released InternVL3.5 remote code builds it
        stand_in = dict(llm, architectures=['Qwen2ForCausalLM'], model_type='qwen2'); stand_in.pop('head_dim', None)
        config = InternVLChatConfig(**dict(cfg, llm_config=stand_in))
        config.llm_config = transformers.Qwen3Config(**llm)
        model = InternVLChatModel(config, language_model=transformers.Qwen3ForCausalLM(config.llm_config), use_flash_attn=False)
    else:
        model = InternVLChatModel(InternVLChatConfig(**dict(cfg, llm_config=llm)), use_flash_attn=False)
    model = model.to(torch.bfloat16)
tied = bool(llm.get('tie_word_embeddings')) and arch == 'Qwen3ForCausalLM'
ctx = llm['vocab_size'] - 1
model.img_context_token_id = ctx
model.vision_model.requires_grad_(False)
model.language_model.config.use_cache = False
model.language_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=dict(use_reentrant=False))
targets = ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj'] + ([] if tied else ['lm_head'])
model.language_model = get_peft_model(model.language_model, LoraConfig(r=128, lora_alpha=256, lora_dropout=0.05, target_modules=targets))
model.language_model.enable_input_require_grads()
for p in model.mlp1.parameters(): p.requires_grad = True
if not decode_only:
    trainable = [p for p in model.parameters() if p.requires_grad]
    print('arch', arch, 'tied', tied, 'trainable params', sum(p.numel() for p in trainable), 'total', sum(p.numel() for p in model.parameters()))
    opt = torch.optim.AdamW(trainable, lr=1e-5, weight_decay=0.05)
    pv = torch.randn(B * T, 3, 448, 448, device='cuda', dtype=torch.bfloat16)
    ids = torch.randint(1000, 90000, (B, S), device='cuda')
    ids[:, 10:10 + 256 * T] = ctx
    labels = ids.clone(); labels[:, :S - 40] = -100
    flags = torch.ones(B * T, 1, dtype=torch.long, device='cuda')
    model.train()
    def step():
        out = model(pixel_values=pv, input_ids=ids, attention_mask=torch.ones_like(ids), image_flags=flags, labels=labels, return_dict=True)
        out.loss.backward(); torch.nn.utils.clip_grad_norm_(trainable, 1.0); opt.step(); opt.zero_grad(set_to_none=True)
        return out.loss
    for _ in range(2): step()
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
    t0 = time.time(); n = 5
    for _ in range(n): step()
    torch.cuda.synchronize(); dt = (time.time() - t0) / n
    print(json.dumps(dict(what='train_lora_step', arch=arch, batch=B, tiles_per_sample=T, seq=S, s_per_step=round(dt, 3),
        tokens_per_s=round(B * S / dt), peak_mem_gib=round(torch.cuda.max_memory_allocated() / 2**30, 1))))
    del opt, trainable; torch.cuda.empty_cache()

model.eval(); lm = model.language_model.merge_and_unload(); model.language_model = lm; lm.config.use_cache = True
pv1 = torch.randn(13, 3, 448, 448, device='cuda', dtype=torch.bfloat16)
pid = torch.randint(1000, 90000, (1, 3400), device='cuda'); pid[:, 10:10 + 13 * 256] = ctx
with torch.no_grad():
    for rep in range(2):
        torch.cuda.synchronize(); t0 = time.time()
        out = model.generate(pixel_values=pv1, input_ids=pid, attention_mask=torch.ones_like(pid), max_new_tokens=1, min_new_tokens=1, do_sample=False)
        torch.cuda.synchronize(); ttft = time.time() - t0
        t0 = time.time()
        out = model.generate(pixel_values=pv1, input_ids=pid, attention_mask=torch.ones_like(pid), max_new_tokens=129, min_new_tokens=129, do_sample=False, eos_token_id=None)
        torch.cuda.synchronize(); total = time.time() - t0
    print(json.dumps(dict(what='decode_b1', arch=arch, prompt_tokens=3400, ttft_s=round(ttft, 3), decode_tok_per_s=round(128 / (total - ttft), 1))))
