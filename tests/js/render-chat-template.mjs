// Renders Hugging Face chat templates with @huggingface/jinja, the Jinja implementation of transformers.js.
// Usage: node render-chat-template.mjs CASES.json  — CASES is an array of
//   { "template": "...", "messages": [{ "role": "...", "content": "..." }], "add_generation_prompt": bool, "bos_token": "..." | null }
// Prints a JSON array of the rendered strings, in order.
import { readFileSync } from "node:fs";
import { Template } from "@huggingface/jinja";

const cases = JSON.parse(readFileSync(process.argv[2], "utf8"));
const rendered = cases.map(c => new Template(c.template).render({
  messages: c.messages,
  add_generation_prompt: c.add_generation_prompt,
  bos_token: c.bos_token,
}));
process.stdout.write(JSON.stringify(rendered));
