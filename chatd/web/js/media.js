// Media in the web client (docs/media.md): uploads with progress and cancel, downloads with the
// token (fetch -> blob: URL, cached per URL: <img>/<audio> cannot send an Authorization header),
// the voice recorder (MediaRecorder), and how an attachment is shown: an image thumbnail (the
// placeholder first, then the thumbnail; click for the full image), an audio player (with the voice
// message's waveform) or a video player (with the server's poster frame), or a
// file card with name and size. Everything the server sent is inserted as text or attribute.

import { ApiError } from "./api.js";
import { el } from "./view.js";

const blobs = new Map();  // url -> Promise<blob: URL>

export function mediaUrl(api, url) {
  if (!blobs.has(url)) {
    blobs.set(url, fetch(url, { headers: { Authorization: `Bearer ${api.token}` } }).then(async (r) => {
      if (!r.ok) {
        let err = {};
        try { err = (await r.json()).error || {}; } catch (e) { /* not JSON */ }
        throw new ApiError(err.code || `http_${r.status}`, err.message || r.statusText, r.status);
      }
      return URL.createObjectURL(await r.blob());
    }));
    blobs.get(url).catch(() => blobs.delete(url));  // a failure is retried by the next render
  }
  return blobs.get(url);
}

/** Forget the fetched media (after a logout). */
export function forgetMedia() {
  for (const p of blobs.values()) p.then((u) => URL.revokeObjectURL(u), () => {});
  blobs.clear();
}

/**
 * Upload `file` (a File or Blob) with `name`; `onProgress(fraction)`. Returns {done, abort}: `done`
 * resolves to the media metadata or rejects with an ApiError (code "cancelled" after abort()).
 */
export function upload(api, file, name, onProgress) {
  const xhr = new XMLHttpRequest();
  const done = new Promise((resolve, reject) => {
    xhr.open("POST", `/v1/media?name=${encodeURIComponent(name)}`);
    xhr.setRequestHeader("Authorization", `Bearer ${api.token}`);
    xhr.setRequestHeader("Content-Type", "application/octet-stream");
    xhr.upload.onprogress = (ev) => { if (ev.lengthComputable) onProgress(ev.loaded / ev.total); };
    xhr.onload = () => {
      let data = null;
      try { data = JSON.parse(xhr.responseText); } catch (e) { /* not JSON */ }
      if (xhr.status === 201 && data) return resolve(data.media);
      const err = (data && data.error) || {};
      reject(new ApiError(err.code || `http_${xhr.status}`, err.message || xhr.statusText, xhr.status,
                          xhr.getResponseHeader("Retry-After")));
    };
    xhr.onerror = () => reject(new ApiError("network", "the upload was interrupted"));
    xhr.onabort = () => reject(new ApiError("cancelled", "upload cancelled"));
    xhr.send(file);
  });
  return { done, abort: () => xhr.abort() };
}

export function humanSize(n) {
  if (n < 1024) return `${n} B`;
  if (n < 1024 * 1024) return `${(n / 1024).toFixed(1)} KB`;
  return `${(n / 1024 / 1024).toFixed(1)} MB`;
}

/** The element of one attachment of a message. */
export function attachmentItem(api, a, onOpen) {
  if (a.kind === "image") {
    const thumb = a.thumbnails && a.thumbnails.length ? a.thumbnails[0] : null;
    const w = thumb ? thumb.width : a.width;
    const h = thumb ? thumb.height : a.height;
    const img = el("img", { class: "att-img", alt: a.name, width: w, height: h, src: a.placeholder || null,
                            "data-loaded": "placeholder" });
    mediaUrl(api, thumb ? thumb.url : a.url).then((u) => { img.src = u; img.dataset.loaded = "thumbnail"; },
                                                   () => { img.dataset.loaded = "failed"; });
    return el("button", { type: "button", class: "att att-image", "data-media": a.id,
                          "aria-label": `Open image ${a.name}`, onclick: () => onOpen(a) }, img);
  }
  if (a.kind === "audio" || a.kind === "video") {
    const player = el(a.kind, { controls: true, preload: "metadata", class: `att-${a.kind}` });
    mediaUrl(api, a.url).then((u) => { player.src = u; }, () => player.replaceWith(fileCard(api, a)));
    if (a.kind === "video" && a.thumbnails && a.thumbnails.length) {  // the server's poster frame
      mediaUrl(api, a.thumbnails[0].url).then((u) => { player.poster = u; }, () => {});
    }
    const label = a.duration_s ? `${a.name} (${Math.round(a.duration_s)} s)` : a.name;
    const wave = a.kind === "audio" && Array.isArray(a.waveform) && a.waveform.length ? waveform(a.waveform, player, a.duration_s) : null;
    return el("div", { class: `att att-${a.kind}-box`, "data-media": a.id }, wave, player,
              el("span", { class: "att-name", text: label }));
  }
  return fileCard(api, a);
}

const SVG = "http://www.w3.org/2000/svg";

/**
 * A voice message's waveform (the server's 64 peaks, 0-255) as SVG bars, scaled to the loudest;
 * the bars already played are marked as the player plays, and a click seeks there (`duration_s`, the
 * server's decoded duration, where the player knows none: MediaRecorder's WebM says Infinity).
 */
function waveform(peaks, player, duration_s) {
  const length = () => (Number.isFinite(player.duration) && player.duration > 0 ? player.duration : duration_s || 0);
  const top = Math.max(1, ...peaks);
  const svg = document.createElementNS(SVG, "svg");
  svg.setAttribute("class", "att-wave");
  svg.setAttribute("viewBox", `0 0 ${peaks.length * 3} 32`);
  svg.setAttribute("preserveAspectRatio", "none");
  svg.setAttribute("role", "img");
  svg.setAttribute("aria-label", "Waveform");
  const bars = peaks.map((p, i) => {
    const h = Math.max(1, Math.round((p / top) * 30));
    const r = document.createElementNS(SVG, "rect");
    for (const [k, v] of [["x", i * 3], ["y", 31 - h], ["width", 2], ["height", h]]) r.setAttribute(k, String(v));
    svg.append(r);
    return r;
  });
  player.addEventListener("timeupdate", () => {
    const played = length() ? (player.currentTime / length()) * bars.length : 0;
    bars.forEach((r, i) => r.classList.toggle("played", i < played));
  });
  svg.addEventListener("click", (ev) => {
    const box = svg.getBoundingClientRect();
    if (length() && box.width) player.currentTime = ((ev.clientX - box.left) / box.width) * length();
  });
  return svg;
}

function fileCard(api, a) {
  const save = el("button", { type: "button", class: "link", onclick: async () => {
    const link = el("a", { href: await mediaUrl(api, a.url), download: a.name });
    document.body.append(link);
    link.click();
    link.remove();
  } }, "Download");
  return el("div", { class: "att att-file", "data-media": a.id },
    el("span", { class: "att-name", text: a.name }), el("span", { class: "att-size", text: humanSize(a.size) }), save);
}

/** The full image over the page; Escape or the button closes it. */
export function openLightbox(api, a) {
  const img = el("img", { class: "lightbox-img", alt: a.name });
  const close = () => { box.remove(); document.removeEventListener("keydown", onKey); };
  const onKey = (ev) => { if (ev.key === "Escape") close(); };
  const box = el("div", { id: "lightbox", class: "lightbox", role: "dialog", "aria-label": a.name },
    img, el("button", { type: "button", class: "lightbox-close", onclick: close }, "Close"));
  document.addEventListener("keydown", onKey);
  document.body.append(box);
  mediaUrl(api, a.url).then((u) => { img.src = u; });
}

/** The voice recorder: start() asks for the microphone; stop() resolves to a Blob. */
export class Recorder {
  constructor() { this.rec = null; this.chunks = []; }

  get recording() { return !!this.rec; }

  async start() {
    const stream = await navigator.mediaDevices.getUserMedia({ audio: true });
    const type = ["audio/webm;codecs=opus", "audio/ogg;codecs=opus", "audio/webm"]
      .find((t) => window.MediaRecorder && MediaRecorder.isTypeSupported(t));
    this.rec = new MediaRecorder(stream, type ? { mimeType: type } : {});
    this.chunks = [];
    this.rec.ondataavailable = (ev) => { if (ev.data.size) this.chunks.push(ev.data); };
    this.rec.start();
  }

  stop() {
    const rec = this.rec;
    this.rec = null;
    return new Promise((resolve) => {
      rec.onstop = () => {
        rec.stream.getTracks().forEach((t) => t.stop());
        resolve(new Blob(this.chunks, { type: rec.mimeType || "audio/webm" }));
      };
      rec.stop();
    });
  }
}
