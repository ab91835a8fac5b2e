// The official OpenAI Node SDK against live gateways: the Responses API (an input image, the streamed event
// sequence, previous_response_id answered by a second replica, the forced image_generation tool with partial
// images, retrieve / input items / delete), legacy completions, models.retrieve and request ids.
// Usage: node responses.mjs BASE_URL_A BASE_URL_B API_KEY MODEL IMAGE.png
// Prints one JSON object describing what came back; tests/server/supervisor/test_responses_sdk.py checks it.
import fs from "node:fs";
import OpenAI from "openai";

const [baseA, baseB, apiKey, model, imagePath] = process.argv.slice(2);
const a = new OpenAI({ baseURL: baseA, apiKey, maxRetries: 0, timeout: 300_000 });
const b = new OpenAI({ baseURL: baseB, apiKey, maxRetries: 0, timeout: 300_000 });
const image = "data:image/png;base64," + fs.readFileSync(imagePath).toString("base64");
const out = {};

const first = await a.responses.create({ model, max_output_tokens: 6, input: [{ role: "user", content: [
  { type: "input_image", image_url: image }, { type: "input_text", text: "What is in this picture?" }] }] });
out.create = { id: first.id, status: first.status, text: first.output_text, usage: first.usage,
  request_id: first._request_id ?? null };

const events = [];
for await (const ev of await a.responses.create({ model, input: "Tell me a story.", max_output_tokens: 5,
  stream: true })) events.push({ type: ev.type, seq: ev.sequence_number, delta: ev.delta ?? null });
out.stream = events;

const second = await b.responses.create({ model, input: "And then?", max_output_tokens: 4,
  previous_response_id: first.id });
out.follow_up = { previous: second.previous_response_id, input_tokens: second.usage.input_tokens };

const tool = { type: "image_generation", size: "64x64", quality: "low", partial_images: 1 };
const toolEvents = [];
let final = null;
for await (const ev of await a.responses.create({ model, input: "Draw a red fox.", max_output_tokens: 6,
  tools: [tool], tool_choice: { type: "image_generation" }, stream: true })) {
  toolEvents.push(ev.type);
  if (ev.type === "response.completed" || ev.type === "response.incomplete") final = ev.response;
}
const call = final.output.find((o) => o.type === "image_generation_call");
out.tool = { events: toolEvents, result_magic: Buffer.from(call.result, "base64").subarray(0, 4).toString("hex"),
  revised_prompt: call.revised_prompt };

out.retrieved = (await b.responses.retrieve(first.id)).id;
out.input_items = (await a.responses.inputItems.list(first.id)).data.map((i) => i.content.map((c) => c.type));
await a.responses.delete(first.id);
try {
  await b.responses.retrieve(first.id);
  out.after_delete = null;
} catch (err) {
  out.after_delete = err.status;
}

const completion = await a.completions.create({ model, prompt: "Once upon a time", max_tokens: 3 });
out.completion = { text: completion.choices[0].text, tokens: completion.usage.completion_tokens };
out.model = (await a.models.retrieve(model)).id;
console.log(JSON.stringify(out));
