// One WebSocket to chatd (docs/protocol.md), kept alive for as long as the tab is logged in.
//
// Policy: requests get ids; a reply with that id resolves the request, an `error` with it rejects it
// (ChatdError with the server's code). Every request has a deadline (code "timeout"). When the socket
// closes, every open request is rejected with code "disconnected" and the connection reconnects:
// backoff 1, 2, 4 … 30 s with jitter (at once when the browser comes back online), a fresh ws_url
// from `resolveUrl` (GET /v1/connect: a cluster may have moved this user to another shard), then
// `auth` with the caller's cursors, so missed messages arrive before any live one. A heartbeat not
// answered within two intervals counts as a dead socket. invalid_token/token_expired on auth end the
// session (`onFatal`); nothing else does.

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

export class Connection {
  /**
   * @param {object} o
   * @param {string} o.token
   * @param {(first: boolean) => Promise<string>} o.resolveUrl  the WebSocket URL to use now
   * @param {() => object} o.cursors  channel id -> highest contiguous seq held
   * @param {(frame: object) => void} o.onEvent  server events (frames without a known id)
   * @param {(auth: object, sync: object|null) => void} o.onReady  authenticated and caught up
   * @param {(state: string, detail: object) => void} o.onState  "connecting" | "online" | "offline" | "stopped"
   * @param {(err: ChatdError) => void} o.onFatal  the session is over (log in again)
   */
  constructor(o) {
    Object.assign(this, o);
    this.ws = null;
    this.pending = new Map();
    this.nextId = 1;
    this.stopped = false;
    this.ready = false;
    this.attempt = 0;
    this.wake = null;
    this.drop = null;
    this.heartbeat = null;
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
      if (!this.ws || this.ws.readyState !== WebSocket.OPEN) {
        reject(new ChatdError("disconnected", "not connected"));
        return;
      }
      const id = `r${this.nextId++}`;
      const timer = setTimeout(() => {
        this.pending.delete(id);
        reject(new ChatdError("timeout", `no answer to ${frame.type} within ${timeoutMs / 1000} s`));
      }, timeoutMs);
      this.pending.set(id, { resolve, reject, timer, expect, frames: [] });
      this.ws.send(JSON.stringify({ ...frame, id }));
    });
  }

  async loop() {
    let first = true;
    while (!this.stopped) {
      let closeInfo;
      try {
        closeInfo = await this.session(first);
      } catch (err) {
        if (FATAL.has(err.code)) { this.stop(); this.onFatal(err); return; }
        if (this.drop) this.drop(err.message);
        closeInfo = { reason: err.message };
      }
      first = false;
      if (this.stopped) return;
      if (closeInfo && closeInfo.code === 1000) { this.stop(); return; }  // after our logout
      const delayS = Math.min(30, 2 ** this.attempt) * (0.5 + Math.random() / 2);
      this.attempt = Math.min(this.attempt + 1, 5);
      this.onState("offline", { retryInS: delayS, ...closeInfo });
      await new Promise((resolve) => {
        const t = setTimeout(resolve, delayS * 1000);
        this.wake = () => { clearTimeout(t); resolve(); };
      });
      this.wake = null;
    }
  }

  /** One socket's life: resolves with {code, reason} when it is gone; throws a fatal auth error. */
  async session(first) {
    this.onState("connecting", {});
    const url = await this.resolveUrl(first);
    if (this.stopped) return {};
    const ws = new WebSocket(url, "chatd.v1.json");
    this.ws = ws;
    let finish;
    const done = new Promise((resolve) => { finish = resolve; });
    let over = false;
    let openTimer = null;
    const end = (info) => {
      if (over) return;
      over = true;
      this.ready = false;
      clearInterval(this.heartbeat);
      clearTimeout(openTimer);
      ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
      try { ws.close(); } catch (e) { /* closing an unopened socket */ }
      if (this.ws === ws) this.ws = null;
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
    // a known close code in words; the server's own reason text only for codes we do not know
    ws.onclose = (ev) => end({ code: ev.code, reason: closeReason(ev.code, ev.reason) });
    ws.onerror = () => {};  // a close event follows
    ws.onmessage = (ev) => this.dispatch(ev.data);
    const opened = new Promise((resolve) => { ws.onopen = resolve; });
    const which = await Promise.race([opened.then(() => "open"), done.then(() => "closed")]);
    if (which === "closed") return done;
    clearTimeout(openTimer);
    const cursors = this.cursors();
    const withSync = Object.keys(cursors).length > 0;
    let replies;
    try {
      const frame = { type: "auth", token: this.token };
      if (withSync) frame.cursors = cursors;
      const r = await this.request(frame, 30000, withSync ? 2 : 1);
      replies = withSync ? r : [r];
    } catch (err) {
      if (FATAL.has(err.code)) { end({ code: 0, reason: err.message }); throw err; }
      end({ code: 0, reason: err.message, error: err });
      return done;
    }
    const [auth, sync] = replies;
    this.ready = true;
    this.attempt = 0;
    const intervalMs = (auth.heartbeat_interval_s || 5) * 1000;
    this.heartbeat = setInterval(() => {
      this.request({ type: "heartbeat" }, intervalMs * 2).catch((err) => {
        if (err.code === "timeout") end({ code: 0, reason: "the server stopped answering" });
      });
    }, intervalMs);
    this.onState("online", {});
    try {
      this.onReady(auth, sync || null);
    } catch (err) {
      console.error("chatd: handling the auth reply failed", err);
    }
    return done;
  }

  dispatch(data) {
    let frame;
    try { frame = JSON.parse(data); } catch (e) { return; }
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
