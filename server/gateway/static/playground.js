// Mini-Gemini playground: talks to this gateway's OpenAI-compatible API (same origin, relative URLs so that a
// reverse proxy may mount the gateway under a path prefix). Vanilla JS, no dependencies.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const el = (tag, props = {}, ...children) => {
    const node = Object.assign(document.createElement(tag), props);
    node.append(...children.filter((c) => c !== null && c !== undefined));
    return node;
  };
  const ACCEPTED = ["image/png", "image/jpeg", "image/webp", "image/gif", "image/bmp"];
  const MAX_SIDE = 2048; // larger uploads are scaled down in the browser before sending
  const KEY_STORE = "mgm-playground-key";

  const state = {
    // chat messages of the conversation (without the system prompt), and the id of its last stored response when
    // it goes through the Responses API (the server then holds the conversation, images included)
    conversation: { messages: [], responseId: null },
    attachments: [], // {url, name} data URLs waiting to be sent
    controller: null, // AbortController of the running chat request
  };

  // --- API ---------------------------------------------------------------------------------------------------------

  class APIError extends Error {
    constructor(message, { status = null, type = null, param = null, code = null } = {}) {
      super(message);
      Object.assign(this, { status, type, param, code });
    }
  }

  function fromErrorBody(body, status) {
    const e = body && typeof body === "object" ? body.error : null;
    if (e && typeof e === "object" && typeof e.message === "string") {
      return new APIError(e.message, { status, type: e.type, param: e.param, code: e.code });
    }
    return null;
  }

  async function responseError(response) {
    const text = await response.text().catch(() => "");
    let body = null;
    try { body = JSON.parse(text); } catch { /* not JSON: shown as text below */ }
    return fromErrorBody(body, response.status) || new APIError(
      `The gateway answered ${response.status} ${response.statusText}${text ? ": " + text.slice(0, 300) : ""}`,
      { status: response.status });
  }

  function headers(json = true) {
    const h = json ? { "Content-Type": "application/json" } : {}; // FormData sets its own multipart boundary
    const key = $("api-key").value.trim();
    if (key) h.Authorization = "Bearer " + key;
    return h;
  }

  // GET without a body; POST with a JSON body, or with a FormData body as multipart (the edits endpoint).
  async function api(path, body, signal) {
    let response;
    const form = body instanceof FormData;
    try {
      response = await fetch(path, {
        method: body === undefined ? "GET" : "POST", headers: headers(!form), signal,
        body: body === undefined || form ? body : JSON.stringify(body),
      });
    } catch (err) {
      if (err.name === "AbortError") throw err;
      throw new APIError(`Could not reach the gateway (${err.message}). Is it still running?`);
    }
    if (!response.ok) throw await responseError(response);
    return response;
  }

  // Server-sent events from a fetch body: yields {event, data} per event, as soon as each one is complete.
  async function* sseEvents(response) {
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    const parse = (raw) => {
      let event = "message";
      const data = [];
      for (const line of raw.split("\n")) {
        if (!line || line.startsWith(":")) continue;
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        let value = colon < 0 ? "" : line.slice(colon + 1);
        if (value.startsWith(" ")) value = value.slice(1);
        if (field === "event") event = value;
        else if (field === "data") data.push(value);
      }
      return data.length ? { event, data: data.join("\n") } : null;
    };
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value.replace(/\r/g, ""); // JSON payloads escape \r, so bare ones are line-ending noise
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = parse(buffer.slice(0, cut));
        buffer = buffer.slice(cut + 2);
        if (event) yield event;
      }
    }
    const last = parse(buffer);
    if (last) yield last;
  }

  function describe(err) {
    if (!(err instanceof APIError)) return { title: "Something went wrong in the page", detail: String(err) };
    const bits = [err.status, err.type, err.code].filter(Boolean).join(" · ");
    const detail = err.message + (err.param ? `\n(parameter: ${err.param})` : "");
    return { title: bits ? `Error ${bits}` : "Error", detail };
  }

  function showError(box, err) {
    const { title, detail } = describe(err);
    box.replaceChildren(el("strong", { textContent: title }), document.createTextNode(detail));
    box.hidden = false;
  }

  function errorBox(err) {
    const box = el("div", { className: "error" });
    box.setAttribute("role", "alert");
    showError(box, err);
    return box;
  }

  // --- numbers and JSON from the settings ---------------------------------------------------------------------------

  function number(id, integer = false) {
    const input = $(id);
    const raw = input.value.trim();
    if (raw === "") return undefined;
    const value = Number(raw);
    if (!Number.isFinite(value) || (integer && !Number.isInteger(value))) {
      const name = document.querySelector(`label[for="${id}"]`).textContent;
      throw new APIError(`${name} must be ${integer ? "a whole number" : "a number"}, got "${raw}".`);
    }
    return value;
  }

  function extraBody() {
    const raw = $("extra").value.trim();
    if (!raw) return {};
    let value;
    try { value = JSON.parse(raw); } catch (err) {
      throw new APIError(`Extra JSON body is not valid JSON: ${err.message}`);
    }
    if (!value || typeof value !== "object" || Array.isArray(value)) {
      throw new APIError("Extra JSON body must be a JSON object, e.g. {\"top_k\": 40}.");
    }
    return value;
  }

  function compact(obj) {
    return Object.fromEntries(Object.entries(obj).filter(([, v]) => v !== undefined && v !== ""));
  }

  // --- connection: API key and models -----------------------------------------------------------------------------

  async function loadModels() {
    const status = $("conn-status");
    try {
      const body = await (await api("v1/models")).json();
      const ids = (body.data || []).map((m) => m.id);
      $("models").replaceChildren(...ids.map((id) => el("option", { value: id })));
      if (!$("model").value && ids.length) $("model").value = ids[0];
      $("model").placeholder = ids.length ? "model id" : "no model yet";
      status.textContent = ids.length ? `Connected: ${ids.length} model${ids.length > 1 ? "s" : ""}.` : "Connected; no model is up yet.";
      status.classList.remove("bad");
    } catch (err) {
      status.textContent = err.status === 401 && !$("api-key").value.trim()
        ? "This gateway needs an API key: enter it above." : describe(err).detail;
      status.classList.add("bad");
    }
  }

  // --- images in the composer --------------------------------------------------------------------------------------

  function readAsDataURL(blob) {
    return new Promise((resolve, reject) => {
      const reader = new FileReader();
      reader.onload = () => resolve(reader.result);
      reader.onerror = () => reject(reader.error);
      reader.readAsDataURL(blob);
    });
  }

  async function imageDataURL(file) {
    if (!ACCEPTED.includes(file.type)) {
      throw new APIError(`"${file.name || "pasted item"}" is not a supported image (PNG, JPEG, WebP, GIF or BMP).`);
    }
    const bitmap = await createImageBitmap(file).catch(() => null);
    if (!bitmap) throw new APIError(`"${file.name || "pasted image"}" could not be decoded as an image.`);
    const scale = Math.min(1, MAX_SIDE / Math.max(bitmap.width, bitmap.height));
    if (scale === 1) { bitmap.close(); return readAsDataURL(file); }
    const canvas = el("canvas", { width: Math.round(bitmap.width * scale), height: Math.round(bitmap.height * scale) });
    canvas.getContext("2d").drawImage(bitmap, 0, 0, canvas.width, canvas.height);
    bitmap.close();
    return canvas.toDataURL(file.type === "image/png" ? "image/png" : "image/jpeg", 0.92);
  }

  async function attach(files) {
    const box = $("composer-error");
    box.hidden = true;
    for (const file of files) {
      try {
        state.attachments.push({ url: await imageDataURL(file), name: file.name || "pasted image" });
      } catch (err) {
        showError(box, err);
      }
    }
    renderAttachments();
  }

  function renderAttachments() {
    $("attachments").replaceChildren(...state.attachments.map((a, i) => {
      const remove = el("button", { type: "button", className: "secondary", textContent: "×", title: "Remove" });
      remove.setAttribute("aria-label", `Remove image ${i + 1} (${a.name})`);
      remove.addEventListener("click", () => { state.attachments.splice(i, 1); renderAttachments(); $("prompt").focus(); });
      return el("li", {}, el("img", { src: a.url, alt: `Attached image ${i + 1}: ${a.name}` }), remove);
    }));
  }

  // --- chat --------------------------------------------------------------------------------------------------------

  // The text with every <h>…</h> span (the model's image prompts in generation mode) highlighted.
  function renderText(node, text) {
    const parts = [];
    let at = 0;
    for (const m of text.matchAll(/<h>([\s\S]*?)<\/h>/g)) {
      if (m.index > at) parts.push(document.createTextNode(text.slice(at, m.index)));
      parts.push(el("span", { className: "h-span", textContent: m[0], title: "image prompt" }));
      at = m.index + m[0].length;
    }
    if (at < text.length) parts.push(document.createTextNode(text.slice(at)));
    node.replaceChildren(...parts);
  }

  function figure(image, index) {
    const caption = image.caption || "";
    const img = el("img", { src: image.image_url && image.image_url.url, alt: caption ? `Generated image: ${caption}` : `Generated image ${index + 1}` });
    img.addEventListener("load", scrollDown, { once: true }); // its height is known only now
    return el("figure", {}, img, el("figcaption", {}, el("b", { textContent: "<h> " }), caption));
  }

  function bubble(role) {
    const who = el("p", { className: "who", textContent: role === "user" ? "You" : "Mini-Gemini" });
    const node = el("article", { className: `msg ${role}` }, who);
    const log = $("log");
    log.querySelector(".empty")?.remove();
    log.append(node);
    return node;
  }

  function scrollDown() { const log = $("log"); log.scrollTop = log.scrollHeight; }

  function setBusy(busy) {
    $("send").disabled = busy;
    $("stop").hidden = !busy;
    $("log").setAttribute("aria-busy", String(busy));
  }

  // The request without its messages, from the settings (throws APIError on a malformed field).
  function chatSettings() {
    const stream = $("stream").checked;
    const body = compact({
      model: $("model").value.trim(), stream, temperature: number("temperature"), top_p: number("top-p"),
      max_tokens: number("max-tokens", true), seed: number("seed", true),
    });
    if (stream) body.stream_options = { include_usage: true }; // token counts for the message footer
    if ($("gen").checked) {
      body.modalities = ["text", "image"];
      body.image_options = compact({
        size: $("gen-size").value.trim(), num_inference_steps: number("gen-steps", true), seed: number("gen-seed", true),
      });
    }
    return { ...body, ...extraBody() };
  }

  // Chat content → Responses input parts.
  function inputItem(message) {
    const text = message.role === "assistant" ? "output_text" : "input_text";
    const content = typeof message.content === "string" ? [{ type: text, text: message.content }]
      : message.content.map((p) => (p.type === "image_url" ? { type: "input_image", image_url: p.image_url.url } : { type: text, text: p.text }));
    return { role: message.role, content };
  }

  // The Responses request of a turn from the chat settings: only the new message when the server holds the
  // conversation (a stored previous response), else every turn as input items. "Generate images" lists the
  // image_generation tool with the image settings.
  function responsesRequest(chat, conversation, turn, system) {
    const { model, stream, temperature, top_p, max_tokens, seed, modalities, image_options, stream_options, ...extra } = chat;
    const body = compact({
      model, stream, temperature, top_p, seed, max_output_tokens: max_tokens, instructions: system,
      previous_response_id: conversation.responseId || undefined, ...extra,
    });
    body.input = (conversation.responseId ? [turn] : [...conversation.messages, turn]).map(inputItem);
    if (modalities) body.tools = [{ type: "image_generation", partial_images: 1, ...image_options }];
    return body;
  }

  // What a streamed answer tells the page: text, images (previews too), usage, the end.
  function chatEvent(ev, out) {
    if (ev.data === "[DONE]") return true;
    let chunk;
    try { chunk = JSON.parse(ev.data); } catch { return false; }
    const err = fromErrorBody(chunk, null);
    if (ev.event === "error" || err) throw err || new APIError("The stream ended with an error.");
    if (chunk.usage) out.usage = { tokens: chunk.usage.completion_tokens };
    for (const choice of chunk.choices || []) {
      if (choice.index) continue; // the page asks for one choice
      const delta = choice.delta || {};
      if (delta.content) out.text(delta.content);
      if (Array.isArray(delta.images)) out.images.push(...delta.images);
      if (choice.finish_reason) out.finish = choice.finish_reason;
    }
    return false;
  }

  function toolImage(item) {
    return { caption: item.revised_prompt || "", image_url: { url: `data:image/${item.output_format || "png"};base64,${item.result}` } };
  }

  function responseDone(response, out) {
    out.responseId = response.id;
    out.usage = response.usage && { tokens: response.usage.output_tokens };
    out.finish = response.status === "incomplete" ? "length" : "stop";
  }

  function responsesEvent(ev, out) {
    let data;
    try { data = JSON.parse(ev.data); } catch { return false; }
    const err = fromErrorBody(data, null);
    if (ev.event === "error" || err) throw err || new APIError("The stream ended with an error.");
    switch (data.type) {
      case "response.output_text.delta": out.text(data.delta || ""); break;
      case "response.image_generation_call.partial_image": out.preview(data); break;
      case "response.output_item.done":
        if (data.item && data.item.type === "image_generation_call" && data.item.result) out.images.push(toolImage(data.item));
        break;
      case "response.failed": {
        const e = (data.response && data.response.error) || {};
        throw new APIError(e.message || "The response failed.", { code: e.code });
      }
      case "response.completed": case "response.incomplete": responseDone(data.response, out); return true;
      default: break;
    }
    return false;
  }

  function parseResponse(payload, out) {
    for (const item of payload.output || []) {
      if (item.type === "message") out.text((item.content || []).map((p) => p.text || "").join(""));
      else if (item.type === "image_generation_call" && item.result) out.images.push(toolImage(item));
    }
    responseDone(payload, out);
  }

  async function send(event) {
    event?.preventDefault();
    if (state.controller) return;
    const text = $("prompt").value.trim();
    const attachments = state.attachments.slice();
    if (!text && !attachments.length) { $("prompt").focus(); return; }
    const composerError = $("composer-error");
    composerError.hidden = true;
    let request;
    try { request = chatSettings(); } catch (err) { showError(composerError, err); return; }
    const system = $("system").value.trim();

    const content = attachments.length
      ? [...attachments.map((a) => ({ type: "image_url", image_url: { url: a.url } })), ...(text ? [{ type: "text", text }] : [])]
      : text;
    const turn = { role: "user", content };
    const conversation = state.conversation; // "Clear chat" replaces it: a late answer must not leak into the new one
    const history = conversation.messages;
    const viaResponses = $("api").value === "responses";
    if (viaResponses) request = responsesRequest(request, conversation, turn, system);
    else request.messages = [...(system ? [{ role: "system", content: system }] : []), ...history, turn];
    $("prompt").value = "";
    state.attachments = [];
    renderAttachments();

    const userNode = bubble("user");
    for (const [i, a] of attachments.entries()) userNode.append(el("img", { className: "thumb", src: a.url, alt: `Your image ${i + 1}: ${a.name}` }));
    if (text) userNode.append(el("div", { className: "text", textContent: text }));
    const botNode = bubble("assistant");
    const textNode = el("div", { className: "text" });
    const meta = el("p", { className: "meta" });
    botNode.append(textNode);
    botNode.setAttribute("aria-busy", "true");
    scrollDown();

    const controller = new AbortController();
    state.controller = controller;
    setBusy(true);
    const started = performance.now();
    let answer = "";
    const out = { images: [], finish: null, usage: null, responseId: null, text: null, preview: null };
    // Re-rendering the whole answer per token is quadratic: paint at most once per frame, and give the browser a
    // turn every 50 ms even when the stream arrives faster than it is parsed (Stop and scrolling stay responsive).
    let painting = false, lastYield = performance.now();
    const paint = () => { painting = false; renderText(textNode, answer); scrollDown(); };
    out.text = (piece) => {
      answer += piece;
      if (!painting) { painting = true; requestAnimationFrame(paint); }
    };
    let preview = null; // the image tool's latest partial image, replaced by the next one and by the final image
    out.preview = (data) => {
      preview?.remove();
      const n = data.partial_image_index + 1;
      preview = el("figure", { className: "preview" },
        el("img", { src: `data:image/${data.output_format || "png"};base64,${data.partial_image_b64}`, alt: `Preview ${n} of the image being drawn` }),
        el("figcaption", { textContent: `Drawing… preview ${n}` }));
      botNode.append(preview);
      scrollDown();
    };
    try {
      const response = await api(viaResponses ? "v1/responses" : "v1/chat/completions", request, controller.signal);
      if (request.stream) {
        for await (const ev of sseEvents(response)) {
          if (performance.now() - lastYield > 50) {
            await new Promise((resolve) => setTimeout(resolve, 0));
            lastYield = performance.now();
          }
          if ((viaResponses ? responsesEvent : chatEvent)(ev, out)) break;
        }
      } else {
        const payload = await response.json();
        if (viaResponses) parseResponse(payload, out);
        else {
          const choice = (payload.choices || [])[0] || {};
          out.text((choice.message && choice.message.content) || "");
          out.images.push(...((choice.message && choice.message.images) || []));
          out.finish = choice.finish_reason;
          out.usage = payload.usage && { tokens: payload.usage.completion_tokens };
        }
      }
      paint(); // the last tokens, whether or not a frame came since
      history.push(turn, { role: "assistant", content: answer });
      // chat turns are not stored: a later Responses turn sends the whole conversation again
      conversation.responseId = out.responseId;
    } catch (err) {
      if (err.name === "AbortError") {
        out.finish = "stopped";
        if (answer) history.push(turn, { role: "assistant", content: answer });
        conversation.responseId = null; // a stopped response is not stored: the next turn sends the whole conversation
      } else {
        // The turn was not answered: drop it from the conversation and give it back to the composer.
        userNode.classList.add("failed");
        const why = answer ? "The answer broke off" : "Not sent";
        userNode.append(el("p", { className: "meta", textContent: `${why} — your message is back in the box below.` }));
        botNode.append(errorBox(err));
        if (!answer) textNode.remove();
        $("prompt").value = text;
        state.attachments = attachments;
        renderAttachments();
      }
    } finally {
      state.controller = null;
      setBusy(false);
      botNode.setAttribute("aria-busy", "false");
    }
    preview?.remove();
    const { images, finish, usage } = out;
    images.forEach((image, i) => botNode.append(figure(image, i)));
    const seconds = ((performance.now() - started) / 1000).toFixed(1);
    const facts = [usage && `${usage.tokens} tokens`, `${seconds} s`, finish && `finish: ${finish}`,
      images.length && `${images.length} image${images.length > 1 ? "s" : ""}`].filter(Boolean);
    if (!botNode.querySelector(".error")) { meta.textContent = facts.join(" · "); botNode.append(meta); }
    scrollDown();
    $("prompt").focus();
  }

  function clearChat() {
    state.controller?.abort();
    state.conversation = { messages: [], responseId: null };
    $("log").replaceChildren(el("p", { className: "empty", textContent: "New conversation." }));
    $("composer-error").hidden = true;
    $("prompt").focus();
  }

  // --- images tab --------------------------------------------------------------------------------------------------

  async function generateImages(event) {
    event.preventDefault();
    const button = $("img-go"), status = $("img-status"), errorBoxNode = $("img-error"), results = $("img-results");
    errorBoxNode.hidden = true;
    let body;
    try {
      body = compact({
        prompt: $("img-prompt").value.trim(), size: $("img-size").value.trim(), n: number("img-n", true),
        num_inference_steps: number("img-steps", true), seed: number("img-seed", true),
        enhance_prompt: $("img-enhance").checked, response_format: "b64_json",
      });
      if ($("img-negative").value.trim()) body.negative_prompt = $("img-negative").value.trim();
    } catch (err) { showError(errorBoxNode, err); return; }
    button.disabled = true;
    results.setAttribute("aria-busy", "true");
    const started = performance.now();
    const tick = setInterval(() => { status.textContent = `Generating… ${((performance.now() - started) / 1000).toFixed(0)} s`; }, 500);
    status.textContent = "Generating…";
    try {
      const payload = await (await api("v1/images/generations", body)).json();
      const seconds = ((performance.now() - started) / 1000).toFixed(1);
      results.replaceChildren(...(payload.data || []).map((item, i) => {
        const src = item.b64_json ? "data:image/png;base64," + item.b64_json : item.url;
        const how = { enhanced: "rewritten by Mini-Gemini", no_caption: "the model wrote no <h> caption: your prompt, unchanged", disabled: "your prompt, unchanged" }[payload.prompt_enhancement] || "";
        return el("figure", {},
          el("img", { src, alt: `Generated image ${i + 1}: ${item.revised_prompt || body.prompt}` }),
          el("figcaption", {}, el("b", { textContent: "Revised prompt: " }), el("span", { className: "revised", textContent: item.revised_prompt || "" }),
            how ? el("span", { textContent: ` (${how})` }) : null));
      }));
      status.textContent = `${(payload.data || []).length} image(s), ${payload.size}, ${seconds} s.`;
    } catch (err) {
      showError(errorBoxNode, err);
      status.textContent = "";
    } finally {
      clearInterval(tick);
      button.disabled = false;
      results.setAttribute("aria-busy", "false");
    }
  }

  // --- edit tab ----------------------------------------------------------------------------------------------------
  // The image is kept as a canvas at the size it is sent (scaled down to MAX_SIDE); the mask is a second canvas of
  // that size where painted pixels are opaque. It is sent as OpenAI's mask: transparent where painted, opaque elsewhere.

  const EDIT_TYPES = ["image/png", "image/jpeg", "image/webp"];
  const edit = { image: null, mask: null, painted: false, painting: false, busy: false };

  function canvasOf(width, height) { return el("canvas", { width, height }); }

  function canvasBlob(canvas) {
    return new Promise((resolve, reject) => canvas.toBlob((b) => (b ? resolve(b) : reject(new APIError("Could not encode the image."))), "image/png"));
  }

  async function bitmapOf(file, what) {
    const bitmap = await createImageBitmap(file).catch(() => null);
    if (!bitmap) throw new APIError(`"${file.name || what}" could not be decoded as an image.`);
    return bitmap;
  }

  async function loadEditImage(file) {
    $("edit-error").hidden = true;
    if (!EDIT_TYPES.includes(file.type)) {
      throw new APIError(`"${file.name || "pasted item"}" is not a PNG, JPEG or WebP image (what edits take).`);
    }
    const bitmap = await bitmapOf(file, "pasted image");
    const scale = Math.min(1, MAX_SIDE / Math.max(bitmap.width, bitmap.height));
    const image = canvasOf(Math.round(bitmap.width * scale), Math.round(bitmap.height * scale));
    image.getContext("2d").drawImage(bitmap, 0, 0, image.width, image.height);
    bitmap.close();
    Object.assign(edit, { image, mask: canvasOf(image.width, image.height), painted: false });
    drawEdit();
  }

  function drawEdit() {
    const view = $("edit-canvas");
    view.classList.toggle("blank", !edit.image);
    $("edit-empty").hidden = !!edit.image;
    $("edit-mask-status").textContent = !edit.image ? "" : edit.painted
      ? "Mask: only the red part is redrawn." : "No mask: the whole image is redrawn.";
    if (!edit.image) return;
    view.width = edit.image.width;
    view.height = edit.image.height;
    const ctx = view.getContext("2d");
    ctx.drawImage(edit.image, 0, 0);
    ctx.globalAlpha = 0.5;
    ctx.drawImage(edit.mask, 0, 0);
    ctx.globalAlpha = 1;
  }

  function paintAt(event) {
    const view = $("edit-canvas"), rect = view.getBoundingClientRect();
    const k = view.width / rect.width; // canvas pixels per CSS pixel
    const ctx = edit.mask.getContext("2d");
    ctx.fillStyle = "#e0245e";
    ctx.beginPath();
    ctx.arc((event.clientX - rect.left) * k, (event.clientY - rect.top) * k, Number($("edit-brush").value) * k / 2, 0, 2 * Math.PI);
    ctx.fill();
    edit.painted = true;
    drawEdit();
  }

  // An uploaded OpenAI mask (transparent = redraw), shown as paint: scaled to the image, alpha < 50% counts as painted.
  async function loadEditMask(file) {
    $("edit-error").hidden = true;
    if (!edit.image) throw new APIError("Choose the image first, then its mask.");
    if (file.type !== "image/png") throw new APIError("A mask is a PNG whose transparent pixels mark what to change.");
    const bitmap = await bitmapOf(file, "mask");
    const { width, height } = edit.image;
    const read = canvasOf(width, height).getContext("2d");
    read.drawImage(bitmap, 0, 0, width, height);
    bitmap.close();
    const pixels = read.getImageData(0, 0, width, height);
    let painted = 0;
    for (let i = 0; i < pixels.data.length; i += 4) {
      const hole = pixels.data[i + 3] < 128;
      painted += hole;
      pixels.data.set(hole ? [224, 36, 94, 255] : [0, 0, 0, 0], i);
    }
    edit.mask.getContext("2d").putImageData(pixels, 0, 0);
    edit.painted = painted > 0;
    drawEdit();
  }

  function maskBlob() {
    const { width, height } = edit.image;
    const out = canvasOf(width, height), ctx = out.getContext("2d");
    ctx.fillStyle = "#000";
    ctx.fillRect(0, 0, width, height);
    ctx.globalCompositeOperation = "destination-out"; // painted pixels become fully transparent
    ctx.drawImage(edit.mask, 0, 0);
    return canvasBlob(out);
  }

  function editFigure(data, caption, preview) {
    const mime = `image/${data.output_format || "png"}`;
    const node = el("figure", { className: preview ? "preview" : "" },
      el("img", { src: `data:${mime};base64,${data.b64_json}`, alt: preview ? caption : `Edited image: ${data.revised_prompt || ""}` }),
      el("figcaption", {}, ...(preview ? [caption] : [el("b", { textContent: "Revised prompt: " }),
        el("span", { className: "revised", textContent: data.revised_prompt || "" }), caption ? ` (${caption})` : ""])));
    return node;
  }

  async function editImage(event) {
    event.preventDefault();
    if (edit.busy) return;
    const button = $("edit-go"), status = $("edit-status"), errorNode = $("edit-error"), results = $("edit-results");
    errorNode.hidden = true;
    let fields;
    try {
      if (!edit.image) throw new APIError("Choose, drop or paste the image to edit first.");
      fields = compact({
        prompt: $("edit-prompt").value.trim(), num_inference_steps: number("edit-steps", true),
        strength: number("edit-strength"), seed: number("edit-seed", true), partial_images: number("edit-previews", true),
      });
    } catch (err) { showError(errorNode, err); return; }
    edit.busy = button.disabled = true;
    results.setAttribute("aria-busy", "true");
    results.dataset.previews = "0";
    const started = performance.now();
    const elapsed = () => ((performance.now() - started) / 1000).toFixed(1);
    status.textContent = "Mini-Gemini is reading the image…";
    try {
      const form = new FormData();
      form.append("image", await canvasBlob(edit.image), "image.png");
      if (edit.painted) form.append("mask", await maskBlob(), "mask.png");
      for (const [k, v] of Object.entries(fields)) form.append(k, String(v));
      form.append("enhance_prompt", String($("edit-enhance").checked));
      form.append("stream", "true");
      form.append("response_format", "b64_json");
      let previews = 0, finals = 0;
      for await (const ev of sseEvents(await api("v1/images/edits", form))) {
        let data;
        try { data = JSON.parse(ev.data); } catch { continue; }
        if (ev.event === "error" || data.type === "error") throw fromErrorBody(data, null) || new APIError("The edit failed.");
        if (data.type === "image_edit.partial_image") {
          previews += 1;
          results.dataset.previews = String(previews);
          results.replaceChildren(editFigure(data, `Preview ${previews} of ${fields.partial_images ?? 0}`, true));
          status.textContent = `Preview ${previews}, ${elapsed()} s…`;
        } else if (data.type === "image_edit.completed") {
          const how = { enhanced: "written by Mini-Gemini", no_caption: "the model wrote no <h> caption: your instruction, unchanged", disabled: "your instruction, unchanged" }[data.prompt_enhancement] || "";
          if (!finals++) results.replaceChildren();
          results.append(editFigure(data, how, false));
        }
      }
      if (!finals) throw new APIError("The stream ended without an image.");
      status.textContent = `Done: ${previews} preview(s), then the image, ${elapsed()} s.`;
    } catch (err) {
      showError(errorNode, err);
      status.textContent = "";
    } finally {
      edit.busy = button.disabled = false;
      results.setAttribute("aria-busy", "false");
    }
  }

  function wireEdit() {
    const fail = (err) => showError($("edit-error"), err);
    const view = $("edit-canvas"), drop = $("edit-drop");
    view.addEventListener("pointerdown", (e) => {
      if (!edit.image) return;
      edit.painting = true;
      view.setPointerCapture(e.pointerId);
      paintAt(e);
    });
    view.addEventListener("pointermove", (e) => { if (edit.painting) paintAt(e); });
    for (const type of ["pointerup", "pointercancel"]) view.addEventListener(type, () => { edit.painting = false; });
    $("edit-file").addEventListener("change", async (e) => {
      const [file] = e.target.files;
      e.target.value = "";
      if (file) await loadEditImage(file).catch(fail);
    });
    $("edit-mask-file").addEventListener("change", async (e) => {
      const [file] = e.target.files;
      e.target.value = "";
      if (file) await loadEditMask(file).catch(fail);
    });
    $("edit-clear-mask").addEventListener("click", () => {
      if (!edit.image) return;
      Object.assign(edit, { mask: canvasOf(edit.image.width, edit.image.height), painted: false });
      drawEdit();
    });
    drop.addEventListener("dragover", (e) => {
      if (![...e.dataTransfer.types].includes("Files")) return;
      e.preventDefault();
      drop.classList.add("dragging");
    });
    drop.addEventListener("dragleave", () => drop.classList.remove("dragging"));
    drop.addEventListener("drop", (e) => {
      drop.classList.remove("dragging");
      const [file] = [...(e.dataTransfer?.files || [])];
      if (!file) return;
      e.preventDefault();
      loadEditImage(file).catch(fail);
    });
    document.addEventListener("paste", (e) => {
      if ($("panel-edit").hidden) return;
      const file = [...(e.clipboardData?.items || [])].find((it) => it.kind === "file")?.getAsFile();
      if (!file) return;
      e.preventDefault();
      loadEditImage(file).catch(fail);
    });
    $("edit-form").addEventListener("submit", editImage);
    drawEdit();
  }

  // --- tabs (WAI-ARIA tabs pattern: arrow keys, Home/End) ---------------------------------------------------------

  function selectTab(tab, focus = true) {
    for (const t of document.querySelectorAll('[role="tab"]')) {
      const on = t === tab;
      t.setAttribute("aria-selected", String(on));
      t.tabIndex = on ? 0 : -1;
      $(t.getAttribute("aria-controls")).hidden = !on;
    }
    if (focus) tab.focus();
  }

  function tabKeys(event) {
    const tabs = [...document.querySelectorAll('[role="tab"]')];
    const i = tabs.indexOf(event.target);
    const next = { ArrowRight: i + 1, ArrowLeft: i - 1, Home: 0, End: tabs.length - 1 }[event.key];
    if (next === undefined) return;
    event.preventDefault();
    selectTab(tabs[(next + tabs.length) % tabs.length]);
  }

  // --- wiring ------------------------------------------------------------------------------------------------------

  function init() {
    const composer = $("composer");

    const key = $("api-key");
    key.value = sessionStorage.getItem(KEY_STORE) || "";
    key.addEventListener("change", () => { sessionStorage.setItem(KEY_STORE, key.value.trim()); loadModels(); });

    composer.addEventListener("submit", send);
    $("prompt").addEventListener("keydown", (e) => {
      if (e.key === "Enter" && !e.shiftKey && !e.isComposing) send(e);
    });
    document.addEventListener("keydown", (e) => { if (e.key === "Escape" && state.controller) state.controller.abort(); });
    $("stop").addEventListener("click", () => state.controller?.abort());
    $("clear").addEventListener("click", clearChat);
    $("file").addEventListener("change", async (e) => { await attach([...e.target.files]); e.target.value = ""; });

    // Drop anywhere on the chat panel; paste anywhere while the chat tab is shown.
    const panel = $("panel-chat");
    panel.addEventListener("dragover", (e) => {
      if (![...e.dataTransfer.types].includes("Files")) return;
      e.preventDefault();
      composer.classList.add("dragging");
    });
    panel.addEventListener("dragleave", (e) => { if (!panel.contains(e.relatedTarget)) composer.classList.remove("dragging"); });
    panel.addEventListener("drop", (e) => {
      composer.classList.remove("dragging");
      const files = [...(e.dataTransfer?.files || [])];
      if (!files.length) return;
      e.preventDefault();
      attach(files);
    });
    document.addEventListener("paste", (e) => {
      if (panel.hidden) return;
      const files = [...(e.clipboardData?.items || [])].filter((it) => it.kind === "file").map((it) => it.getAsFile()).filter(Boolean);
      if (!files.length) return; // plain text pastes as usual
      e.preventDefault();
      attach(files);
    });

    for (const tab of document.querySelectorAll('[role="tab"]')) {
      tab.addEventListener("click", () => selectTab(tab));
      tab.addEventListener("keydown", tabKeys);
    }
    $("image-form").addEventListener("submit", generateImages);
    wireEdit();
    loadModels();
  }

  init();
})();
