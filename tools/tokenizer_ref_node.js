// Provisional tokenizer references with the Rust Hugging Face `tokenizers` (its Node binding, npm `tokenizers` 0.23.2),
// for when no Python is at hand. It gives the *fast* tokenizers' ids; tools/tokenizer_ref.py (transformers, the slow
// tokenizers InternVL loads) is the reference of record and overwrites the file.
//   npm install --prefix /tmp/js tokenizers@0.23.2
//   NODE_PATH=/tmp/js/node_modules node tools/tokenizer_ref_node.js FIXTURES_DIR CORPUS_JSON OUT_JSON
const fs = require('fs'), os = require('os'), path = require('path');
const { Tokenizer } = require('tokenizers');
const [fixtures, corpusPath, outPath] = process.argv.slice(2);
const texts = JSON.parse(fs.readFileSync(corpusPath, 'utf8')).texts;
const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'tokref-'));

const INTERNVL = ['<img>', '</img>', '<IMG_CONTEXT>', '<quad>', '</quad>', '<ref>', '</ref>', '<box>', '</box>'];
const added = (id, content, special, rstrip = false) =>
  ({ id, content, single_word: false, lstrip: false, rstrip, normalized: false, special });

// InternVL's Qwen folders: the base special tokens up to lastBaseId, then InternVL's tokens.
function internvlQwen(lastBaseId) {
  const t = JSON.parse(fs.readFileSync(path.join(fixtures, 'tokenizers/qwen3/tokenizer.json'), 'utf8'));
  t.added_tokens = t.added_tokens.filter(a => a.id <= lastBaseId);
  INTERNVL.forEach((c, i) => t.added_tokens.push(added(lastBaseId + 1 + i, c, true)));
  return t;
}

// Phi-3-mini: Llama 2's model plus its added tokens; legacy=false, as the slow LlamaTokenizer would build it.
const PHI3 = ['<|endoftext|>', '<|assistant|>', '<|placeholder1|>', '<|placeholder2|>', '<|placeholder3|>', '<|placeholder4|>',
  '<|system|>', '<|end|>', '<|placeholder5|>', '<|placeholder6|>', '<|user|>'];
function phi3() {
  const t = JSON.parse(fs.readFileSync(path.join(fixtures, 'tokenizers/llama2/tokenizer.json'), 'utf8'));
  t.added_tokens = t.added_tokens.map(a => a.content === '</s>' ? { ...a, rstrip: true, special: false } : a);
  PHI3.forEach((c, i) => t.added_tokens.push(added(32000 + i, c, true, i !== 0)));
  t.normalizer = null;
  t.pre_tokenizer = { type: 'Metaspace', replacement: '\u2581', prepend_scheme: 'first', split: false };
  return t;
}

function fromJson(name, json) {
  const file = path.join(tmp, name + '.json');
  fs.writeFileSync(file, JSON.stringify(json));
  return Tokenizer.fromFile(file);
}

const tokenizers = {
  'qwen3': Tokenizer.fromFile(path.join(fixtures, 'tokenizers/qwen3/tokenizer.json')),
  'internvl-qwen2.5': fromJson('q25', internvlQwen(151664)),
  'internvl-qwen3': fromJson('q3', internvlQwen(151668)),
  'llama2': Tokenizer.fromFile(path.join(fixtures, 'tokenizers/llama2/tokenizer.json')),
  'phi3': fromJson('phi3', phi3()),
};

(async () => {
  const out = { tool: 'tokenizers 0.23.2 (Rust, Node binding): fast-tokenizer ids, provisional', tokenizers: {} };
  for (const [name, tok] of Object.entries(tokenizers)) {
    const cases = [];
    for (const text of texts) {
      const withSpecial = (await tok.encode(text, null, { addSpecialTokens: true })).getIds();
      const bare = (await tok.encode(text, null, { addSpecialTokens: false })).getIds();
      cases.push({ text, ids: Array.from(withSpecial), bare_ids: Array.from(bare),
        decoded: await tok.decode(Array.from(withSpecial), true), decoded_bare: await tok.decode(Array.from(bare), false) });
    }
    out.tokenizers[name] = cases;
  }
  fs.writeFileSync(outPath, JSON.stringify(out, null, 0).replace(/\},\{"text"/g, '},\n{"text"'));
  fs.rmSync(tmp, { recursive: true });
})();
