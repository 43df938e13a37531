// bench/tokenize_speed.mjs: the Rust tokenizers library's encoding speed (through the
// @anush008/tokenizers Node binding), the reference side of bench/tokenize_speed.py.
//
//   node bench/tokenize_speed.mjs NPM_PREFIX TOKENIZER_JSON TEXT_FILE REPEAT
//
// Encodes the whole file in one call REPEAT times (after one warm-up call) and prints the
// median in MB/s (10^6 bytes of UTF-8 per second) and the token count.
import fs from 'fs';
import path from 'path';
import { createRequire } from 'module';

const [prefix, tokPath, textPath, repeatArg] = process.argv.slice(2);
const require = createRequire(path.join(path.resolve(prefix), 'package.json'));
const { Tokenizer } = require('@anush008/tokenizers');
const tok = Tokenizer.fromFile(tokPath);
const text = fs.readFileSync(textPath, 'utf8');
const bytes = Buffer.byteLength(text, 'utf8');
const repeat = Number(repeatArg || 5);
let n = (await tok.encode(text, null, { addSpecialTokens: false })).getIds().length;
const secs = [];
for (let r = 0; r < repeat; r++) {
  const t0 = process.hrtime.bigint();
  const e = await tok.encode(text, null, { addSpecialTokens: false });
  secs.push(Number(process.hrtime.bigint() - t0) / 1e9);
  n = e.getLength();
}
secs.sort((a, b) => a - b);
const med = secs[Math.floor(repeat / 2)];
console.log(`rust tokenizers: ${(bytes / med / 1e6).toFixed(2)} MB/s (${bytes} bytes, ${n} ` +
            `tokens, median of ${repeat} runs of ${(med * 1e3).toFixed(1)} ms; best ` +
            `${(bytes / secs[0] / 1e6).toFixed(2)} MB/s)`);
