// The edgeai-agent page: create a job through the JSON API, follow its events, show the image.
"use strict";

const $ = (id) => document.getElementById(id);
const TOKEN_KEY = "edgeai-token";

// The address scripts/run prints carries the token once (?token=...): kept, then taken off the
// address bar so it is not bookmarked or shared.
(function takeTokenFromAddress() {
  const url = new URL(window.location.href);
  const given = url.searchParams.get("token");
  if (given) {
    localStorage.setItem(TOKEN_KEY, given);
    url.searchParams.delete("token");
    window.history.replaceState(null, "", url.pathname + url.search + url.hash);
  }
})();

function token() { return localStorage.getItem(TOKEN_KEY) || ""; }

// An image URL the agent handed out, made relative to this page: the file name and its
// signature (?sig=), which opens that one image. The token itself never goes into a URL.
// Relative, so that the page works under a path prefix (Home Assistant's ingress).
function imageAddress(url) {
  const parsed = new URL(url, window.location.href);
  return "images/" + parsed.pathname.split("/").pop() + parsed.search;
}

function authorization() {
  return token() ? { Authorization: "Bearer " + token() } : {};
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = false;
}

async function api(method, path, body) {
  for (let attempt = 0; attempt < 2; attempt++) {
    const headers = { "Content-Type": "application/json", ...authorization() };
    const response = await fetch(path, { method, headers, body: body && JSON.stringify(body) });
    if (response.status === 401 && attempt === 0) {
      const entered = window.prompt("This agent needs its API token:");
      if (!entered) break;
      localStorage.setItem(TOKEN_KEY, entered);
      continue;
    }
    let data = null;
    try { data = await response.json(); } catch (_) { data = null; }
    if (!response.ok) {
      const message = data && data.error ? data.error.message : "the agent answered " + response.status;
      throw new Error(message);
    }
    return data;
  }
  throw new Error("the API token is missing or wrong");
}

function fillSizes() {
  for (const id of ["width", "height"]) {
    // "picture": the size of the picture to start from (the agent fits it within its bounds).
    $(id).add(new Option("picture's", ""));
    $(id).options[0].hidden = true;
    for (let size = 256; size <= 1024; size += 64) {
      const option = new Option(String(size), String(size), size === 512, size === 512);
      $(id).add(option);
    }
  }
}

// The picture to start from, as a data URL; null for text-to-image.
let initImage = null;
const PICTURE_BYTES = 3 * 1024 * 1024;
const PICTURE_SIDE = 2048;

// A phone photo can be 10 MB: a picture over the agent's bound, or larger than it will ever be
// used, is scaled down here first (JPEG), so any picture a browser can show is accepted.
async function pictureData(file) {
  const bitmap = await createImageBitmap(file);
  const scale = Math.min(1, PICTURE_SIDE / Math.max(bitmap.width, bitmap.height));
  if (scale === 1 && file.size <= PICTURE_BYTES && /^image\/(png|jpeg|webp)$/.test(file.type)) {
    bitmap.close();
    return await new Promise((resolve, reject) => {
      const reader = new FileReader();
      reader.onload = () => resolve(reader.result);
      reader.onerror = () => reject(new Error("the picture cannot be read"));
      reader.readAsDataURL(file);
    });
  }
  const canvas = document.createElement("canvas");
  canvas.width = Math.round(bitmap.width * scale);
  canvas.height = Math.round(bitmap.height * scale);
  canvas.getContext("2d").drawImage(bitmap, 0, 0, canvas.width, canvas.height);
  bitmap.close();
  return canvas.toDataURL("image/jpeg", 0.92);
}

async function choosePicture(file) {
  if (!file) return;
  try {
    initImage = await pictureData(file);
  } catch (_) {
    showError("that file is not a picture this browser can read");
    return;
  }
  $("error").hidden = true;
  $("picture-preview").src = initImage;
  $("picture").hidden = false;
  $("strength").disabled = false;
  for (const id of ["width", "height"]) $(id).value = "";
}

function removePicture() {
  initImage = null;
  $("init_image").value = "";
  $("picture").hidden = true;
  $("strength").disabled = true;
  for (const id of ["width", "height"]) if ($(id).value === "") $(id).value = "512";
}

function request() {
  const body = {
    prompt: $("prompt").value.trim(),
    steps: Number($("steps").value),
    format: $("format").value,
    output: "url",
  };
  for (const id of ["width", "height"]) if ($(id).value !== "") body[id] = Number($(id).value);
  if ($("negative_prompt").value.trim()) body.negative_prompt = $("negative_prompt").value.trim();
  if ($("seed").value !== "") body.seed = Number($("seed").value);
  if ($("model").value !== "") body.model = $("model").value;
  if ($("lora").value !== "") body.loras = [{ name: $("lora").value, weight: Number($("lora_weight").value) }];
  if (initImage) {
    body.init_image = initImage;
    body.strength = Number($("strength").value);
  }
  return body;
}

function progress(text, value) {
  $("progress").hidden = false;
  $("progress-text").textContent = text;
  $("progress-bar").value = value;
}

function showResult(reply) {
  if (reply.status !== "ok") {
    showError(reply.error ? reply.error.message + " (" + reply.error.code + ")" : "the job failed");
    return;
  }
  const address = imageAddress(reply.image.url);
  $("result-image").src = address;
  const timings = reply.timings;
  const from = reply.mode === "img2img" ? "from a picture at strength " + reply.strength + " · " : "";
  $("result-info").textContent =
    from + "seed " + reply.seed + " · " + reply.width + "x" + reply.height + " · " +
    timings.total_s.toFixed(2) + " s (generation " + timings.generation_s.toFixed(2) +
    " s, queue " + timings.queue_wait_s.toFixed(2) + " s)";
  $("download").href = address;
  $("download").setAttribute("download", address.split("?")[0].split("/").pop());
  $("result").hidden = false;
  $("result").dataset.jobId = reply.id;
}

// Server-sent events read through fetch, so that the token travels in the Authorization header
// (EventSource cannot send one, and would put it in the URL).
async function readEvents(path, onEvent) {
  const response = await fetch(path, { headers: authorization() });
  if (!response.ok || !response.body) throw new Error("the agent answered " + response.status);
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let name = "message";
      let data = "";
      for (const line of block.split("\n")) {
        if (line.startsWith("event: ")) name = line.slice(7);
        else if (line.startsWith("data: ")) data += line.slice(6);
      }
      if (data && onEvent(name, JSON.parse(data))) { reader.cancel(); return; }
    }
  }
}

async function follow(jobId) {
  let reply = null;
  try {
    await readEvents("api/jobs/" + jobId + "/events", (name, data) => {
      if (name === "status") {
        if (data.status === "queued") progress("Queued, position " + (data.position || 1), 0);
        if (data.status === "done") { reply = data.reply; return true; }
      }
      if (name === "job") {
        if (data.event === "queued") progress("Queued, position " + data.position, 0);
        if (data.event === "running") progress("Step " + data.step + " of " + data.steps, data.step / data.steps);
      }
      return false;
    });
  } catch (_) {
    // The stream broke (a restart, a proxy): ask once where the job stands.
  }
  if (reply) return reply;
  try {
    const status = await api("GET", "api/jobs/" + jobId);
    return status.reply || null;
  } catch (_) {
    return null;
  }
}

async function generate(submitEvent) {
  submitEvent.preventDefault();
  $("error").hidden = true;
  $("generate").disabled = true;
  try {
    const job = await api("POST", "api/jobs", request());
    progress("Queued, position " + (job.position || 1), 0);
    const reply = await follow(job.id);
    $("progress").hidden = true;
    if (reply) showResult(reply); else showError("lost track of the job; see the gallery");
    await loadGallery();
  } catch (error) {
    $("progress").hidden = true;
    showError(error.message);
  } finally {
    $("generate").disabled = false;
  }
}

async function loadGallery() {
  try {
    const data = await api("GET", "api/images");
    const list = $("gallery");
    list.replaceChildren();
    for (const image of data.images) {
      const item = document.createElement("li");
      const picture = document.createElement("img");
      picture.src = imageAddress(image.url);
      picture.alt = image.prompt;
      picture.loading = "lazy";
      const caption = document.createElement("p");
      const when = new Date(image.created * 1000).toLocaleString();
      caption.textContent = image.prompt + " · seed " + image.seed + " · " + when;
      item.append(picture);
      if (image.source_url) {
        // What it was made from: the picture's thumbnail, and how far it was allowed to change.
        const source = document.createElement("img");
        source.src = imageAddress(image.source_url);
        source.alt = "made from this picture";
        source.className = "source";
        source.loading = "lazy";
        item.append(source);
        caption.textContent += " · from the picture beside it, strength " + image.strength;
      }
      item.append(caption);
      list.append(item);
    }
  } catch (error) {
    showError("cannot load the gallery: " + error.message);
  }
}

// The installed models (the default first, chosen) and the LoRA styles in the agent's folder.
// Without the token yet (asked for at the first Generate), the agent's default model is used.
async function loadChoices() {
  $("model").replaceChildren(new Option("the agent's default", ""));
  try {
    const response = await fetch("api/choices", { headers: authorization() });
    if (!response.ok) return;
    const data = await response.json();
    $("model").replaceChildren(...data.models.map((name) => new Option(name, name, false, name === data.default)));
    $("lora").replaceChildren(new Option("none", ""), ...data.loras.map((name) => new Option(name, name)));
  } catch (_) {
    // The agent is away: the default model, no style.
  }
}

fillSizes();
loadChoices();
$("request").addEventListener("submit", generate);
$("init_image").addEventListener("change", () => choosePicture($("init_image").files[0]));
$("picture-remove").addEventListener("click", removePicture);
$("strength").addEventListener("input", () => { $("strength-value").value = $("strength").value; });
for (const name of ["dragover", "dragenter"]) {
  $("drop").addEventListener(name, (event) => { event.preventDefault(); $("drop").classList.add("over"); });
}
$("drop").addEventListener("dragleave", () => $("drop").classList.remove("over"));
$("drop").addEventListener("drop", (event) => {
  event.preventDefault();
  $("drop").classList.remove("over");
  choosePicture(event.dataTransfer.files[0]);
});
loadGallery();
