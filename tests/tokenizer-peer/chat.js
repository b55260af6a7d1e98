// Reference chat-template renderer for moescope's tests: @huggingface/jinja (the Jinja
// implementation of transformers.js) runs the chat_template of a tokenizer_config.json.
// usage: node chat.js TOKENIZER_CONFIG_JSON INPUT_JSON OUTPUT_JSON
//   INPUT_JSON: {"conversations": [{"messages": [...], "add_generation_prompt": true}, ...]}
//   OUTPUT_JSON: {"rendered": ["..." or {"error": "..."}, ...]}
// Messages are OpenAI/transformers dicts and go to the template unchanged, as transformers'
// apply_chat_template passes them; bos_token/eos_token come from the config like there.
'use strict';
const fs = require('fs');
const { Template } = require('@huggingface/jinja');

function token(t) {
  return t && typeof t === 'object' ? t.content : t;
}

function main() {
  const [configPath, inputPath, outputPath] = process.argv.slice(2);
  if (!outputPath) {
    console.error('usage: node chat.js TOKENIZER_CONFIG_JSON INPUT_JSON OUTPUT_JSON');
    process.exit(2);
  }
  const config = JSON.parse(fs.readFileSync(configPath, 'utf8'));
  if (typeof config.chat_template !== 'string') throw new Error(configPath + ': no chat_template string');
  const template = new Template(config.chat_template);
  const input = JSON.parse(fs.readFileSync(inputPath, 'utf8'));
  const rendered = input.conversations.map((c) => {
    try {
      return template.render({
        messages: c.messages,
        add_generation_prompt: !!c.add_generation_prompt,
        bos_token: token(config.bos_token),
        eos_token: token(config.eos_token),
      });
    } catch (e) {
      return { error: String(e && e.message ? e.message : e) };
    }
  });
  fs.writeFileSync(outputPath, JSON.stringify({ rendered }));
}

try {
  main();
} catch (e) {
  console.error(String(e && e.stack ? e.stack : e));
  process.exit(1);
}
