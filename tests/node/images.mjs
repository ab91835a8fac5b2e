// The official OpenAI Node SDK against a live gateway: image edits (one image, a mask, two images), streamed
// generations and edits, output formats. Usage: node images.mjs BASE_URL API_KEY MODEL IMAGE.png MASK.png
// Prints one JSON object describing what came back; tests/server/supervisor/test_images_sdk.py checks it.
import fs from "node:fs";
import OpenAI, { toFile } from "openai";

const [baseURL, apiKey, model, imagePath, maskPath] = process.argv.slice(2);
const client = new OpenAI({ baseURL, apiKey, maxRetries: 0, timeout: 300_000 });
const png = fs.readFileSync(imagePath);
const mask = fs.readFileSync(maskPath);
const file = (name, data) => toFile(data, name, { type: "image/png" });
const fast = { num_inference_steps: 2 }; // extra fields reach the gateway as multipart fields / JSON keys
const magic = (b64) => Buffer.from(b64, "base64").subarray(0, 12).toString("hex");

const out = {};
let r = await client.images.edit({ model, image: await file("a.png", png), prompt: "make it snowy",
  response_format: "b64_json", ...fast });
out.one = { n: r.data.length, revised_prompt: r.data[0].revised_prompt, size: r.size, magic: magic(r.data[0].b64_json) };

r = await client.images.edit({ model, image: await file("a.png", png), mask: await file("m.png", mask),
  prompt: "a hat", response_format: "b64_json", output_format: "jpeg", ...fast });
out.mask = { n: r.data.length, output_format: r.output_format, magic: magic(r.data[0].b64_json) };

r = await client.images.edit({ model, image: [await file("a.png", png), await file("b.png", png)],
  prompt: "combine them", response_format: "b64_json", output_format: "webp", ...fast });
out.two = { n: r.data.length, output_format: r.output_format, magic: magic(r.data[0].b64_json) };

const events = async (stream) => {
  const seen = [];
  for await (const ev of stream) seen.push({ type: ev.type, partial_image_index: ev.partial_image_index ?? null,
    magic: magic(ev.b64_json) });
  return seen;
};
out.generate_stream = await events(await client.images.generate({ model, prompt: "a fox", size: "64x64",
  stream: true, partial_images: 2, ...fast }));
out.edit_stream = await events(await client.images.edit({ model, image: await file("a.png", png), prompt: "night",
  stream: true, partial_images: 1, ...fast }));

try {
  await client.images.edit({ model, image: await file("a.png", png), mask: await file("m.png", png), prompt: "x" });
  out.bad_mask = null;
} catch (err) {
  out.bad_mask = { status: err.status, param: err.param ?? err.error?.param, code: err.code ?? err.error?.code };
}
console.log(JSON.stringify(out));
