// Reference normalizer for moescope's tokenizer tests: the normalizer of a tokenizer.json run
// by Hugging Face `tokenizers` on each code point of a range, one at a time.
// usage: node normalize.js TOKENIZER_JSON RANGES_JSON OUTPUT_JSON
//   RANGES_JSON: [[first, last], ...] (code points, inclusive; surrogates are skipped)
//   OUTPUT_JSON: {"<code point>": "<normalized>", ...} for the code points that change
'use strict';
const fs = require('fs');
const { Tokenizer } = require('tokenizers');

const [tokenizerPath, rangesPath, outputPath] = process.argv.slice(2);
if (!outputPath) {
  console.error('usage: node normalize.js TOKENIZER_JSON RANGES_JSON OUTPUT_JSON');
  process.exit(2);
}
const normalizer = Tokenizer.fromFile(tokenizerPath).getNormalizer();
const out = {};
for (const [first, last] of JSON.parse(fs.readFileSync(rangesPath, 'utf8'))) {
  for (let cp = first; cp <= last; ++cp) {
    if (cp >= 0xd800 && cp <= 0xdfff) continue;
    const s = String.fromCodePoint(cp);
    const r = normalizer ? normalizer.normalizeString(s) : s;
    if (r !== s) out[cp] = r;
  }
}
fs.writeFileSync(outputPath, JSON.stringify(out));
