// tests/tokenizer_ref.mjs: the reference side of tests/test_tokenizer_ref.py. Runs the
// Hugging Face `tokenizers` Rust library (through the @anush008/tokenizers Node binding)
// on one tokenizer.json: encodes every string (with and without special tokens) and
// decodes the ids (with and without skip_special_tokens), and decodes every given id
// sequence.
//
//   node tokenizer_ref.mjs NPM_PREFIX TOKENIZER_JSON IN.json OUT.json
//
// IN.json:  {"strings": ["...", ...], "id_seqs": [[1, 2, 3], ...]}
// OUT.json: {"vocab_size": N, "encode": [[ids]], "encode_plain": [[ids]], "decode": [text],
//            "decode_skip": [text], "seq_decode": [text], "seq_decode_skip": [text]}
import fs from 'fs';
import path from 'path';
import { createRequire } from 'module';

const [prefix, tokPath, inPath, outPath] = process.argv.slice(2);
const require = createRequire(path.join(path.resolve(prefix), 'package.json'));
const { Tokenizer } = require('@anush008/tokenizers');

const tok = Tokenizer.fromFile(tokPath);
const input = JSON.parse(fs.readFileSync(inPath, 'utf8'));
const out = {
  vocab_size: tok.getVocabSize(true), encode: [], encode_plain: [], decode: [],
  decode_skip: [], seq_decode: [], seq_decode_skip: [],
};
for (const s of input.strings) {
  const ids = (await tok.encode(s, null, { addSpecialTokens: true })).getIds();
  const plain = (await tok.encode(s, null, { addSpecialTokens: false })).getIds();
  out.encode.push(ids);
  out.encode_plain.push(plain);
  out.decode.push(await tok.decode(ids, false));
  out.decode_skip.push(await tok.decode(ids, true));
}
for (const ids of input.id_seqs) {
  out.seq_decode.push(await tok.decode(ids, false));
  out.seq_decode_skip.push(await tok.decode(ids, true));
}
fs.writeFileSync(outPath, JSON.stringify(out));
