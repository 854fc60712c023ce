// The teacher server's page: a clip (uploaded or recorded) is decoded by the browser, resampled to
// 16 kHz mono, sent as a 16-bit WAV to /v1/audio/transcriptions, and the answer is shown.
"use strict";

const SAMPLE_RATE = 16000;
const $ = (id) => document.getElementById(id);

function setState(text) { $("state").textContent = text; }
function showError(text) { $("error").textContent = text || ""; }

function authHeaders() {
  const key = $("apikey").value.trim();
  return key ? { Authorization: "Bearer " + key } : {};
}

async function checkHealth() {
  const el = $("health");
  try {
    const r = await fetch("/health", { cache: "no-store" });
    const h = await r.json();
    el.className = r.ok ? "ok" : "down";
    el.textContent = r.ok ? `ready: ${h.model} on ${h.device}` + (h.auth ? " (API key required)" : "")
                          : `server error (HTTP ${r.status})`;
  } catch (e) {
    el.className = "down";
    el.textContent = "server unreachable";
  }
}

// Any decodable audio -> Float32Array at 16 kHz, mono.
async function toMono16k(arrayBuffer) {
  const probe = new OfflineAudioContext(1, 1, SAMPLE_RATE);
  const decoded = await probe.decodeAudioData(arrayBuffer);
  const frames = Math.max(1, Math.ceil(decoded.duration * SAMPLE_RATE));
  const ctx = new OfflineAudioContext(1, frames, SAMPLE_RATE);
  const src = ctx.createBufferSource();
  src.buffer = decoded;
  src.connect(ctx.destination);  // channels are down-mixed to the context's one channel
  src.start();
  const rendered = await ctx.startRendering();
  return rendered.getChannelData(0);
}

function encodeWav16(samples, rate) {
  const buf = new ArrayBuffer(44 + samples.length * 2);
  const v = new DataView(buf);
  const str = (off, s) => { for (let i = 0; i < s.length; i++) v.setUint8(off + i, s.charCodeAt(i)); };
  str(0, "RIFF"); v.setUint32(4, 36 + samples.length * 2, true); str(8, "WAVE");
  str(12, "fmt "); v.setUint32(16, 16, true); v.setUint16(20, 1, true); v.setUint16(22, 1, true);
  v.setUint32(24, rate, true); v.setUint32(28, rate * 2, true); v.setUint16(32, 2, true); v.setUint16(34, 16, true);
  str(36, "data"); v.setUint32(40, samples.length * 2, true);
  for (let i = 0; i < samples.length; i++) {
    // x * 32768, clipped: the exact inverse of how 16-bit PCM decodes (n / 32768)
    v.setInt16(44 + i * 2, Math.max(-32768, Math.min(32767, Math.round(samples[i] * 32768))), true);
  }
  return new Blob([buf], { type: "audio/wav" });
}

async function transcribe(blob, name) {
  showError("");
  $("result").textContent = "";
  setState("converting…");
  let wav;
  try {
    wav = encodeWav16(await toMono16k(await blob.arrayBuffer()), SAMPLE_RATE);
  } catch (e) {
    setState("");
    showError(`the browser could not decode ${name}: ${e.message || e}`);
    return;
  }
  $("player").src = URL.createObjectURL(wav);
  $("player").hidden = false;
  const form = new FormData();
  form.append("file", wav, "clip.wav");
  form.append("prompt", $("prompt").value);
  form.append("response_format", "json");
  setState("waiting for the model…");
  try {
    const r = await fetch("/v1/audio/transcriptions", { method: "POST", body: form, headers: authHeaders() });
    const body = await r.json().catch(() => ({}));
    if (!r.ok) {
      const msg = (body.error && body.error.message) || body.message || r.statusText;
      showError(`HTTP ${r.status}: ${msg}`);
      setState("");
      return;
    }
    $("result").textContent = body.text;
    $("result").dataset.done = "1";
    setState("done");
  } catch (e) {
    showError(`request failed: ${e.message || e}`);
    setState("");
  }
}

$("file").addEventListener("change", () => {
  const f = $("file").files[0];
  if (f) transcribe(f, f.name);
});

let recorder = null;
$("record").addEventListener("click", async () => {
  showError("");
  let stream;
  try {
    stream = await navigator.mediaDevices.getUserMedia({ audio: true });
  } catch (e) {
    showError(`no microphone: ${e.message || e}`);
    return;
  }
  const chunks = [];
  recorder = new MediaRecorder(stream);
  recorder.ondataavailable = (ev) => { if (ev.data.size) chunks.push(ev.data); };
  recorder.onstop = () => {
    stream.getTracks().forEach((t) => t.stop());
    $("record").disabled = false;
    $("stop").disabled = true;
    transcribe(new Blob(chunks, { type: recorder.mimeType }), "the recording");
  };
  recorder.start();
  $("record").disabled = true;
  $("stop").disabled = false;
  setState("recording…");
});
$("stop").addEventListener("click", () => { if (recorder && recorder.state !== "inactive") recorder.stop(); });

$("apikey").value = localStorage.getItem("teacher-api-key") || "";
$("apikey").addEventListener("change", () => localStorage.setItem("teacher-api-key", $("apikey").value.trim()));
checkHealth();
setInterval(checkHealth, 5000);
