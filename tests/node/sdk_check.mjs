// The official OpenAI Node SDK against a running trio_serve: prints what it saw as JSON.
import OpenAI from "openai";

const baseURL = process.env.BASE_URL;
const client = new OpenAI({ baseURL, apiKey: process.env.API_KEY, maxRetries: 0 });
const messages = [{ role: "user", content: "Hello from Node!" }];

const plain = await client.chat.completions.create({ model: "any", messages });
const deltas = [];
const stream = await client.chat.completions.create({
  model: "any", messages, stream: true, stream_options: { include_usage: true },
});
let usage = null;
for await (const chunk of stream) {
  if (chunk.choices.length && chunk.choices[0].delta.content) deltas.push(chunk.choices[0].delta.content);
  if (chunk.usage) usage = chunk.usage;
}
const models = [];
for await (const model of client.models.list()) models.push(model.id);
let wrongKey = null;
try {
  await new OpenAI({ baseURL, apiKey: "wrong", maxRetries: 0 }).models.list();
} catch (error) {
  wrongKey = { name: error.constructor.name, status: error.status };
}
console.log(JSON.stringify({
  plain: plain.choices[0].message.content, finish: plain.choices[0].finish_reason, deltas, usage, models, wrongKey,
}));
