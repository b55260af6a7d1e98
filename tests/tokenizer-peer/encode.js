// Reference encoder for moescope's tokenizer tests: Hugging Face `tokenizers` (Rust, via npm).
// usage: node encode.js TOKENIZER_JSON INPUT_JSON OUTPUT_JSON
//   INPUT_JSON: {"texts": [...], "add_special": false}
//   OUTPUT_JSON: {"ids": [[...], ...], "decoded": ["...", ...]}
// Texts travel as JSON files (not argv) so any Unicode, NUL bytes and long inputs survive intact.
'use strict';
const fs = require('fs');
const { Tokenizer } = require('tokenizers');

async function main() {
  const [tokenizerPath, inputPath, outputPath] = process.argv.slice(2);
  if (!outputPath) {
    console.error('usage: node encode.js TOKENIZER_JSON INPUT_JSON OUTPUT_JSON');
    process.exit(2);
  }
  const tok = Tokenizer.fromFile(tokenizerPath);
  const input = JSON.parse(fs.readFileSync(inputPath, 'utf8'));
  const out = { ids: [], decoded: [] };
  for (const text of input.texts) {
    const enc = await tok.encode(text, null, { addSpecialTokens: !!input.add_special });
    const ids = enc.getIds();
    out.ids.push(ids);
    out.decoded.push(await tok.decode(ids, false));
  }
  fs.writeFileSync(outputPath, JSON.stringify(out));
}

main().catch((e) => {
  console.error(String(e && e.stack ? e.stack : e));
  process.exit(1);
});
