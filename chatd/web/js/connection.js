// One connection to chatd (docs/protocol.md), kept alive for as long as the tab is logged in,
// over whichever transport gets through: WebSocket, else SSE + POST /v1/frames, else long polling
// + POST /v1/frames (docs/protocol.md, section 7: the same frames and cursors on all three).
//
// Policy: requests get ids; a reply with that id resolves the request, an `error` with it rejects it
// (ChatdError with the server's code). Every request has a deadline (code "timeout"). When the
// connection drops, every open request is rejected with code "disconnected" and the connection
// reconnects: backoff 1, 2, 4 … 30 s with jitter (at once when the browser comes back online), fresh
// URLs from `resolveUrls` (GET /v1/connect: a cluster may have moved this user to another shard),
// then the caller's cursors (WebSocket: `auth` with `cursors`; SSE and polling: a start token made
// of them), so missed messages arrive before any live one. A heartbeat not answered within two
// intervals counts as a dead connection. invalid_token/token_expired end the session (`onFatal`).
//
// Fallback: a transport "fails" when it does not become ready within OPEN_TIMEOUT_MS -- it does
// not open, or opens and carries nothing (a proxy that eats frames or buffers a stream). After
// FAILURES_BEFORE_FALLBACK failures in a row WebSocket gives way to SSE, and SSE to long polling.
// The transport that works is remembered for the tab (sessionStorage "chatd.transport"), and while
// on a fallback a WebSocket is tried again every WS_RETRY_MS in the background (a probe: open,
// `auth`, close); when it works the connection moves back to WebSocket.

export class ChatdError extends Error {
  constructor(code, message, frame = {}) {
    super(message);
    this.code = code;
    this.retry_after_ms = frame.retry_after_ms;
  }
}

const FATAL = new Set(["invalid_token", "token_expired"]);
const OPEN_TIMEOUT_MS = 10000;
const REQUEST_TIMEOUT_MS = 15000;
export const TRANSPORTS = ["ws", "sse", "poll"];
export const FAILURES_BEFORE_FALLBACK = 2;
const WS_RETRY_MS = 5 * 60 * 1000;
const POLL_WAIT_S = 25;
const TRANSPORT_KEY = "chatd.transport";
export const TRANSPORT_NAMES = { ws: "WebSocket", sse: "SSE", poll: "long polling" };

/** A resume token made of our own cursors (docs/protocol.md 7.1; a channel at 0 too: followed from
 *  its start); "" when we know no channel (the stream then starts from now). */
export function resumeToken(cursors) {
  if (!Object.keys(cursors).length) return "";
  const text = Object.entries(cursors).map(([c, s]) => `${c}=${s}`).join(",");
  return "1." + btoa(text).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
}

function storedTransport() {
  try {
    const t = sessionStorage.getItem(TRANSPORT_KEY);
    return TRANSPORTS.includes(t) ? t : "ws";
  } catch (e) { return "ws"; }
}

function rememberTransport(t) {
  try { sessionStorage.setItem(TRANSPORT_KEY, t); } catch (e) { /* private mode: not remembered */ }
}

export class Connection {
  /**
   * @param {object} o
   * @param {string} o.token
   * @param {(first: boolean) => Promise<object>} o.resolveUrls  {ws_url, stream_url, poll_url, frames_url} to use now
   * @param {() => object} o.cursors  channel id -> highest contiguous seq held
   * @param {(frame: object) => void} o.onEvent  server events (frames without a known id)
   * @param {(auth: object, sync: object|null) => void} o.onReady  authenticated and caught up
   * @param {(state: string, detail: object) => void} o.onState  "connecting" | "online" | "offline" | "stopped"
   * @param {(err: ChatdError) => void} o.onFatal  the session is over (log in again)
   */
  constructor(o) {
    Object.assign(this, o);
    this.transport = storedTransport();
    if (this.transport === "ws" && typeof WebSocket === "undefined") this.transport = "sse";
    this.failures = 0;  // sessions in a row of this.transport that never became ready
    this.send = null;  // (frame with id) -> void, while a session is up
    this.pending = new Map();
    this.nextId = 1;
    this.stopped = false;
    this.ready = false;
    this.attempt = 0;
    this.wake = null;
    this.drop = null;
    this.heartbeat = null;
    this.probeTimer = null;
    this.urls = null;
    this.onOffline = () => this.drop && this.drop("the browser is offline");
    this.onOnline = () => { this.attempt = 0; if (this.wake) this.wake(); };
  }

  get connected() { return this.ready; }

  start() {
    window.addEventListener("offline", this.onOffline);
    window.addEventListener("online", this.onOnline);
    this.loop();
  }

  stop() {
    this.stopped = true;
    clearTimeout(this.probeTimer);
    window.removeEventListener("offline", this.onOffline);
    window.removeEventListener("online", this.onOnline);
    if (this.drop) this.drop("stopped");
    if (this.wake) this.wake();
    this.onState("stopped", {});
  }

  /** Reconnect now instead of waiting for the backoff. */
  retryNow() { this.attempt = 0; if (this.wake) this.wake(); }

  /** Send `frame` with a fresh id; resolves with the reply (or the list of `expect` replies). */
  request(frame, timeoutMs = REQUEST_TIMEOUT_MS, expect = 1) {
    return new Promise((resolve, reject) => {
      if (!this.send) {
        reject(new ChatdError("disconnected", "not connected"));
        return;
      }
      const id = `r${this.nextId++}`;
      const timer = setTimeout(() => {
        this.pending.delete(id);
        reject(new ChatdError("timeout", `no answer to ${frame.type} within ${timeoutMs / 1000} s`));
      }, timeoutMs);
      this.pending.set(id, { resolve, reject, timer, expect, frames: [] });
      this.send({ ...frame, id });
    });
  }

  async loop() {
    let first = true;
    while (!this.stopped) {
      let closeInfo;
      const transport = this.transport;
      let wasReady = false;
      try {
        closeInfo = await this.session(first, () => { wasReady = true; });
      } catch (err) {
        if (FATAL.has(err.code)) { this.stop(); this.onFatal(err); return; }
        if (this.drop) this.drop(err.message);
        closeInfo = { reason: err.message };
      }
      first = false;
      if (this.stopped) return;
      if (closeInfo && closeInfo.code === 1000) { this.stop(); return; }  // after our logout
      if (closeInfo && closeInfo.code === 4001) {  // token expired or revoked (SSE/poll close event)
        this.stop();
        this.onFatal(new ChatdError("invalid_token", closeInfo.reason || "log in again"));
        return;
      }
      if (wasReady) {
        this.failures = 0;
      } else if (transport === this.transport && ++this.failures >= FAILURES_BEFORE_FALLBACK
                 && this.transport !== "poll" && !(closeInfo && closeInfo.code >= 4000)) {
        this.transport = TRANSPORTS[TRANSPORTS.indexOf(this.transport) + 1];
        this.failures = 0;
        this.attempt = 0;
        console.info(`chatd: falling back to ${TRANSPORT_NAMES[this.transport]}`);
        continue;  // the next transport at once
      }
      const delayS = Math.min(30, 2 ** this.attempt) * (0.5 + Math.random() / 2);
      this.attempt = Math.min(this.attempt + 1, 5);
      this.onState("offline", { retryInS: delayS, transport: this.transport, ...closeInfo });
      await new Promise((resolve) => {
        const t = setTimeout(resolve, delayS * 1000);
        this.wake = () => { clearTimeout(t); resolve(); };
      });
      this.wake = null;
    }
  }

  /** One connection's life on this.transport: resolves with {code, reason} when it is gone;
   *  throws a fatal auth error. `becameReady()` is called once it is authenticated. */
  async session(first, becameReady) {
    this.onState("connecting", { transport: this.transport });
    const urls = await this.resolveUrls(first);
    this.urls = urls;
    if (this.stopped) return {};
    let finish;
    const done = new Promise((resolve) => { finish = resolve; });
    let over = false;
    let openTimer = null;
    const closers = [];
    const end = (info) => {
      if (over) return;
      over = true;
      this.ready = false;
      this.send = null;
      clearInterval(this.heartbeat);
      clearTimeout(openTimer);
      for (const close of closers) { try { close(); } catch (e) { /* already closed */ } }
      this.drop = null;
      for (const [id, p] of this.pending) {
        clearTimeout(p.timer);
        p.reject(new ChatdError("disconnected", info.reason || "connection lost"));
        this.pending.delete(id);
      }
      finish(info);
    };
    this.drop = (reason) => end({ code: 0, reason });
    openTimer = setTimeout(() => end({ code: 0, reason: "the server did not answer" }), OPEN_TIMEOUT_MS);
    const cursors = this.cursors();
    let auth, sync;
    try {
      const opened = this.transport === "ws" ? this.openWs(urls, cursors, end, closers)
        : this.openHttp(urls, cursors, end, closers);
      const r = await Promise.race([opened, done.then(() => null)]);
      if (!r) return done;
      [auth, sync] = r;
    } catch (err) {
      if (FATAL.has(err.code)) { end({ code: 0, reason: err.message }); throw err; }
      end({ code: 0, reason: err.message, error: err });
      return done;
    }
    clearTimeout(openTimer);
    if (over) return done;
    this.ready = true;
    this.attempt = 0;
    becameReady();
    rememberTransport(this.transport);
    if (this.transport !== "ws") this.scheduleProbe();
    const intervalMs = (auth.heartbeat_interval_s || 5) * 1000;
    this.heartbeat = setInterval(() => {
      this.request({ type: "heartbeat" }, intervalMs * 2).catch((err) => {
        if (err.code === "timeout") end({ code: 0, reason: "the server stopped answering" });
      });
    }, intervalMs);
    this.onState("online", { transport: this.transport });
    try {
      this.onReady(auth, sync || null);
    } catch (err) {
      console.error("chatd: handling the auth reply failed", err);
    }
    return done;
  }

  // ---- WebSocket ---------------------------------------------------------------------------
  async openWs(urls, cursors, end, closers) {
    if (typeof WebSocket === "undefined") throw new ChatdError("disconnected", "this browser has no WebSocket");
    const ws = new WebSocket(urls.ws_url, "chatd.v1.json");
    closers.push(() => { ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null; ws.close(); });
    ws.onclose = (ev) => end({ code: ev.code, reason: closeReason(ev.code, ev.reason) });  // known codes in words
    ws.onerror = () => {};  // a close event follows
    ws.onmessage = (ev) => this.dispatchText(ev.data);
    await new Promise((resolve) => { ws.onopen = resolve; });
    this.send = (frame) => ws.send(JSON.stringify(frame));
    const withSync = Object.keys(cursors).length > 0;
    const frame = { type: "auth", token: this.token };
    if (withSync) frame.cursors = cursors;
    const r = await this.request(frame, 30000, withSync ? 2 : 1);
    return withSync ? r : [r];
  }

  // ---- SSE / long polling + POST /v1/frames ------------------------------------------------
  /** Resolves with [ready, sync or null] once the stream (or the first polls) delivered `ready`
   *  and, when one comes, the catch-up's `sync` event. */
  openHttp(urls, cursors, end, closers) {
    const start = resumeToken(cursors);
    let sid = null;
    let readyFrame = null;
    let resolveOpen, rejectOpen;
    const opened = new Promise((resolve, reject) => { resolveOpen = resolve; rejectOpen = reject; });
    const onFrame = (frame) => {
      if (frame.type === "ready") {
        sid = frame.session;
        readyFrame = frame;
        this.send = (f) => this.post(urls.frames_url, sid, f, end);
        if (!frame.catch_up) resolveOpen([frame, null]);
        return;
      }
      if (frame.type === "sync" && readyFrame && !this.ready) { resolveOpen([readyFrame, frame]); return; }
      if (frame.type === "close") {
        end({ code: frame.code, reason: closeReason(frame.code, frame.reason) });
        return;
      }
      this.dispatch(frame);
    };
    const fail = (err) => { rejectOpen(err); end({ code: 0, reason: err.message, error: err }); };
    if (this.transport === "sse") {
      if (typeof EventSource === "undefined") throw new ChatdError("disconnected", "this browser has no EventSource");
      const q = `?token=${encodeURIComponent(this.token)}` + (start ? `&cursor=${encodeURIComponent(start)}` : "");
      const es = new EventSource(urls.stream_url + q);
      closers.push(() => es.close());
      es.onmessage = (ev) => { try { onFrame(JSON.parse(ev.data)); } catch (e) { console.error(e); } };
      // EventSource would reconnect by itself (with Last-Event-ID); we reconnect through our own
      // loop instead, from the cursors we hold, so that pending requests and the state are ours.
      es.onerror = () => end({ code: 0, reason: "the event stream was lost" });
    } else {
      let stopped = false;
      closers.push(() => { stopped = true; if (this.pollAbort) this.pollAbort.abort(); });
      (async () => {
        let cursor = start;
        let lastAnswer = -1;
        while (!stopped) {
          const ctl = new AbortController();
          this.pollAbort = ctl;
          const timer = setTimeout(() => ctl.abort(), (POLL_WAIT_S + 10) * 1000);
          let body;
          try {
            const q = `?wait_s=${POLL_WAIT_S}` + (cursor ? `&cursor=${encodeURIComponent(cursor)}` : "");
            const r = await fetch(urls.poll_url + q, { headers: { Authorization: `Bearer ${this.token}` },
                                                     signal: ctl.signal, cache: "no-store" });
            body = await r.json();
            if (!r.ok) {
              const e = body && body.error ? body.error : { code: "unavailable", message: `HTTP ${r.status}` };
              throw new ChatdError(e.code, e.message, e);
            }
          } catch (err) {
            clearTimeout(timer);
            if (!stopped) fail(err instanceof ChatdError ? err : new ChatdError("disconnected", "the poll failed"));
            return;
          }
          clearTimeout(timer);
          cursor = body.cursor;
          if (body.answer <= lastAnswer && body.answer !== 0) continue;  // the same answer again
          lastAnswer = body.answer;
          for (const f of body.events) { if (!stopped) onFrame(f); }
        }
      })();
    }
    return opened;
  }

  async post(url, sid, frame, end) {
    let body;
    try {
      const r = await fetch(`${url}?session=${encodeURIComponent(sid)}`, {
        method: "POST", cache: "no-store",
        headers: { Authorization: `Bearer ${this.token}`, "Content-Type": "application/json" },
        body: JSON.stringify([frame]),
      });
      body = await r.json();
      if (!r.ok) {
        const e = body && body.error ? body.error : { code: "unavailable", message: `HTTP ${r.status}` };
        if (r.status === 404) end({ code: 0, reason: "the session ended" });
        this.dispatch({ type: "error", id: frame.id, ...e });
        return;
      }
    } catch (err) {
      this.dispatch({ type: "error", id: frame.id, code: "disconnected", message: "the request failed" });
      return;
    }
    for (const reply of body.replies) this.dispatch(reply);
  }

  /** A probe while on a fallback: can a WebSocket get through now? Then move back to it. */
  scheduleProbe() {
    clearTimeout(this.probeTimer);
    this.probeTimer = setTimeout(() => this.probe(), WS_RETRY_MS);
  }

  probe() {
    if (this.stopped || this.transport === "ws" || typeof WebSocket === "undefined" || !this.urls) return;
    let ws;
    try { ws = new WebSocket(this.urls.ws_url, "chatd.v1.json"); } catch (e) { this.scheduleProbe(); return; }
    const give_up = setTimeout(() => { ws.close(); this.scheduleProbe(); }, OPEN_TIMEOUT_MS);
    ws.onopen = () => ws.send(JSON.stringify({ type: "auth", id: "probe", token: this.token }));
    ws.onmessage = (ev) => {
      clearTimeout(give_up);
      ws.close();
      let f = {};
      try { f = JSON.parse(ev.data); } catch (e) { /* not ours */ }
      if (f.type === "auth") {
        this.transport = "ws";
        this.failures = 0;
        rememberTransport("ws");
        if (this.drop) this.drop("moving back to WebSocket");
        this.retryNow();
      } else this.scheduleProbe();
    };
    ws.onerror = () => {};
    ws.onclose = () => { clearTimeout(give_up); if (this.transport !== "ws") this.scheduleProbe(); };
  }

  dispatchText(data) {
    let frame;
    try { frame = JSON.parse(data); } catch (e) { return; }
    this.dispatch(frame);
  }

  dispatch(frame) {
    const p = frame.id != null ? this.pending.get(frame.id) : undefined;
    if (!p) { this.onEvent(frame); return; }
    if (frame.type === "error") {
      clearTimeout(p.timer);
      this.pending.delete(frame.id);
      p.reject(new ChatdError(frame.code, frame.message, frame));
      return;
    }
    p.frames.push(frame);
    if (p.frames.length >= p.expect) {
      clearTimeout(p.timer);
      this.pending.delete(frame.id);
      p.resolve(p.expect === 1 ? p.frames[0] : p.frames);
    }
  }
}

function closeReason(code, serverText) {
  return {
    1000: "logged out",
    1001: "the server is restarting",
    1006: "the connection was lost",
    1008: "the server closed the connection (policy)",
    1009: "a frame was too large",
    1011: "the server hit a bug",
    1013: "the server is busy",
    4000: "the connection was idle",
    4001: "your session ended",
    4029: "too many connections",
  }[code] || serverText || `closed (${code})`;
}
