"""Hugging Face references for tests/VlmTune.Tests/Text/TokenizerParityTests.cs.

Tokenizes every text of tests/VlmTune.Tests/Text/TestData/tokenizer_corpus.json with the *slow* tokenizers that
InternVL loads (AutoTokenizer.from_pretrained(path, use_fast=False)), for each family's tokenizer folder, and writes
tests/VlmTune.Tests/Text/TestData/hf_tokenizer_ref.json. Needs transformers + sentencepiece (no network).

    python3 tools/tokenizer_ref.py FIXTURES_DIR [--internvl-code DIR] [--out PATH]

FIXTURES_DIR is shared/fixtures. The InternVL-style Qwen folders (vocab.json + merges.txt + added tokens) and the
Phi-3-style folder are built here from the shared tokenizers exactly as tests/VlmTune.Tests/Support/TokenizerFolders.cs
writes them. --internvl-code (internvl_chat/ of OpenGVLab/InternVL) adds the InternLM2 tokenizer of the tiny model.
Each case: ids (add_special_tokens=True), bare_ids (False), decoded = decode(ids, skip_special_tokens=True,
spaces_between_special_tokens=False) and, for the byte-level folders, decoded_bare = decode(bare_ids,
skip_special_tokens=False). fast_ids (the fast tokenizer of the same folder, where transformers can build one) are
recorded beside, to see where fast and slow disagree; the tests compare with the slow ids.
"""
import argparse, json, os, shutil, sys, tempfile

import transformers
from transformers import AutoTokenizer

ap = argparse.ArgumentParser()
ap.add_argument('fixtures')
ap.add_argument('--internvl-code')
ap.add_argument('--out', default=os.path.join(os.path.dirname(__file__), '..', 'tests', 'VlmTune.Tests', 'Text', 'TestData', 'hf_tokenizer_ref.json'))
args = ap.parse_args()
here = os.path.dirname(os.path.abspath(__file__))
corpus = json.load(open(os.path.join(here, '..', 'tests', 'VlmTune.Tests', 'Text', 'TestData', 'tokenizer_corpus.json'), encoding='utf-8'))['texts']
tmp = tempfile.mkdtemp(prefix='tokref-')
INTERNVL = ['<img>', '</img>', '<IMG_CONTEXT>', '<quad>', '</quad>', '<ref>', '</ref>', '<box>', '</box>']
PHI3 = ['<|endoftext|>', '<|assistant|>', '<|placeholder1|>', '<|placeholder2|>', '<|placeholder3|>', '<|placeholder4|>',
        '<|system|>', '<|end|>', '<|placeholder5|>', '<|placeholder6|>', '<|user|>']


def token(content, special, rstrip=False):
    return {'content': content, 'lstrip': False, 'normalized': False, 'rstrip': rstrip, 'single_word': False, 'special': special}


def write_qwen(last_base_id):
    """As TokenizerFolders.WriteQwen: the Qwen special tokens up to last_base_id, then InternVL's."""
    d = os.path.join(tmp, 'qwen-%d' % last_base_id); os.makedirs(d)
    tj = json.load(open(os.path.join(args.fixtures, 'tokenizers', 'qwen3', 'tokenizer.json'), encoding='utf-8'))
    json.dump(tj['model']['vocab'], open(os.path.join(d, 'vocab.json'), 'w', encoding='utf-8'), ensure_ascii=False)
    with open(os.path.join(d, 'merges.txt'), 'w', encoding='utf-8') as f:
        f.write('#version: 0.2\n')
        for m in tj['model']['merges']: f.write((' '.join(m) if isinstance(m, list) else m) + '\n')
    added = [dict(a) for a in tj['added_tokens'] if a['id'] <= last_base_id]
    added += [dict(token(c, True), id=last_base_id + 1 + i) for i, c in enumerate(INTERNVL)]
    json.dump({a['content']: a['id'] for a in added}, open(os.path.join(d, 'added_tokens.json'), 'w'), indent=2)
    additional = [a['content'] for a in added if a['special'] and a['id'] > 151643]
    decoder = {str(a['id']): {k: v for k, v in a.items() if k != 'id'} for a in added}
    json.dump({'add_bos_token': False, 'add_prefix_space': False, 'added_tokens_decoder': decoder, 'additional_special_tokens': additional,
               'bos_token': None, 'clean_up_tokenization_spaces': False, 'eos_token': '<|im_end|>', 'errors': 'replace',
               'model_max_length': 16384, 'pad_token': '<|endoftext|>', 'split_special_tokens': False,
               'tokenizer_class': 'Qwen2Tokenizer', 'unk_token': None}, open(os.path.join(d, 'tokenizer_config.json'), 'w'), indent=2)
    tok = lambda c: {'content': c, 'lstrip': False, 'normalized': False, 'rstrip': False, 'single_word': False}
    json.dump({'additional_special_tokens': additional, 'eos_token': tok('<|im_end|>'), 'pad_token': tok('<|endoftext|>')},
              open(os.path.join(d, 'special_tokens_map.json'), 'w'), indent=2)
    return d


def write_phi3():
    """As TokenizerFolders.WritePhi3 (add_bos_token true, no InternVL tokens)."""
    d = os.path.join(tmp, 'phi3'); os.makedirs(d)
    shutil.copy(os.path.join(args.fixtures, 'tokenizers', 'llama2', 'tokenizer.model'), d)
    decoder = {'0': token('<unk>', True), '1': token('<s>', True), '2': token('</s>', False, rstrip=True)}
    for i, c in enumerate(PHI3): decoder[str(32000 + i)] = token(c, True, rstrip=i != 0)
    json.dump({'add_bos_token': True, 'add_eos_token': False, 'added_tokens_decoder': decoder, 'bos_token': '<s>',
               'clean_up_tokenization_spaces': False, 'eos_token': '<|endoftext|>', 'legacy': False, 'model_max_length': 131072,
               'pad_token': '<|endoftext|>', 'padding_side': 'left', 'sp_model_kwargs': {}, 'tokenizer_class': 'LlamaTokenizer',
               'unk_token': '<unk>', 'use_default_system_prompt': False}, open(os.path.join(d, 'tokenizer_config.json'), 'w'), indent=2)
    tok = lambda c: {'content': c, 'lstrip': False, 'normalized': False, 'rstrip': False, 'single_word': False}
    json.dump({'bos_token': tok('<s>'), 'eos_token': tok('<|endoftext|>'), 'pad_token': tok('<|endoftext|>'), 'unk_token': tok('<unk>')},
              open(os.path.join(d, 'special_tokens_map.json'), 'w'), indent=2)
    return d


def llama2():
    # The shared llama2 tokenizer.json belongs to another vocabulary: load tokenizer.model alone.
    d = os.path.join(tmp, 'llama2'); os.makedirs(d)
    for f in ['tokenizer.model', 'tokenizer_config.json']: shutil.copy(os.path.join(args.fixtures, 'tokenizers', 'llama2', f), d)
    return d


folders = {
    'qwen3': (os.path.join(args.fixtures, 'tokenizers', 'qwen3'), True),
    'internvl-qwen2.5': (write_qwen(151664), True),
    'internvl-qwen3': (write_qwen(151668), True),
    'llama2': (llama2(), False),
    'phi3': (write_phi3(), False),
}


def cases(slow, fast, byte_level):
    out = []
    for text in corpus:
        ids = slow(text).input_ids
        bare = slow(text, add_special_tokens=False).input_ids
        c = {'text': text, 'ids': ids, 'bare_ids': bare,
             'decoded': slow.decode(ids, skip_special_tokens=True, spaces_between_special_tokens=False)}
        if byte_level: c['decoded_bare'] = slow.decode(bare, skip_special_tokens=False, spaces_between_special_tokens=False)
        if fast is not None: c['fast_ids'] = fast(text).input_ids
        out.append(c)
    return out


result = {'about': 'Hugging Face tokenizations of tokenizer_corpus.json for TokenizerParityTests, made by tools/tokenizer_ref.py.',
          'tokenizers': {}}
tool = 'transformers %s slow tokenizers (use_fast=False), tools/tokenizer_ref.py' % transformers.__version__
for name, (folder, byte_level) in folders.items():
    slow = AutoTokenizer.from_pretrained(folder, use_fast=False)
    try: fast = AutoTokenizer.from_pretrained(folder, use_fast=True)
    except Exception as e: print(name, 'no fast tokenizer:', e, file=sys.stderr); fast = None
    result['tokenizers'][name] = {'tool': tool + ': ' + type(slow).__name__, 'cases': cases(slow, fast, byte_level)}
    diff = sum(c.get('fast_ids', c['ids']) != c['ids'] for c in result['tokenizers'][name]['cases'])
    print(name, type(slow).__name__, 'fast/slow differ on', diff, 'texts', file=sys.stderr)

if args.internvl_code:
    # InternLM2's remote-code tokenizer, with the NUL piece swapped as shared/tools/make_golden.py does.
    sys.path.insert(0, args.internvl_code)
    from internvl.model.internlm2.tokenization_internlm2 import InternLM2Tokenizer
    from sentencepiece import sentencepiece_model_pb2 as spb
    src = os.path.join(args.fixtures, 'tiny-internvl2', 'model')
    d = os.path.join(tmp, 'internlm2'); os.makedirs(d)
    mp = spb.ModelProto(); mp.ParseFromString(open(os.path.join(src, 'tokenizer.model'), 'rb').read())
    for pc in mp.pieces:
        if '\x00' in pc.piece: pc.piece = '\ue000'
    open(os.path.join(d, 'tokenizer.model'), 'wb').write(mp.SerializeToString())
    for f in ['tokenizer_config.json', 'special_tokens_map.json', 'added_tokens.json']: shutil.copy(os.path.join(src, f), d)
    slow = InternLM2Tokenizer.from_pretrained(d)
    texts = [t for t in corpus if '\x00' not in t and '\ue000' not in t]
    result['tokenizers']['internlm2'] = {'tool': tool + ': InternLM2Tokenizer (NUL piece swapped; texts with NUL left out)',
                                         'cases': [c for c in cases(slow, None, False) if c['text'] in texts]}

s = json.dumps(result, ensure_ascii=False, separators=(',', ':')).replace('},{"text"', '},\n{"text"')
tmp_out = args.out + '.tmp'
open(tmp_out, 'w', encoding='utf-8').write(s)
os.replace(tmp_out, args.out)
shutil.rmtree(tmp)
print('wrote', args.out, file=sys.stderr)
