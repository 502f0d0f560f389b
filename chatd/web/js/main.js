// The chatd web client: login, then one Connection and the channel state it feeds.
//
// Session: the login answer (token, device id, ws_url, user) lives in sessionStorage: it survives a
// reload of this tab and no other tab sees it, so each tab is one device. Un-acked sends are kept
// there too, and sent again with the same client_msg_id after a reconnect or a reload (the server
// stores each client_msg_id once).

import { Api } from "./api.js";
import { Connection } from "./connection.js";
import { CONNECTION, describe, SESSION_OVER } from "./errors.js";
import { Channel, PAGE, uuid } from "./state.js";
import * as media from "./media.js";
import * as view from "./view.js";

const URL_KEYS = ["ws_url", "stream_url", "poll_url", "frames_url"];

const $ = (id) => document.getElementById(id);
const MAX_BODY = 100000;
const TYPING_EVERY_MS = 3000;
const TYPING_SHOWN_MS = 5000;

const store = {
  load(key) { try { return JSON.parse(sessionStorage.getItem(key)); } catch (e) { return null; } },
  save(key, value) { sessionStorage.setItem(key, JSON.stringify(value)); },
  drop(key) { sessionStorage.removeItem(key); },
};

class App {
  constructor() {
    this.api = new Api();
    this.conn = null;
    this.me = null;
    this.session = null;
    this.channels = new Map();
    this.presence = new Map();
    this.currentId = null;
    this.members = null;  // {channelId, ids, ownerId, open}
    this.renderQueued = false;
    this.scrollToEnd = false;
    this.compose = null;  // {kind: "edit" | "reply", seq}: what the composer's next Enter does
    this.prepended = false;
    this.lastTypingSent = 0;
    this.refreshQueued = null;
    this.uploads = new Map();  // key -> {name, size, progress, abort}
    this.mediaLimits = null;  // GET /v1/media/limits
    this.recorder = new media.Recorder();
  }

  // ---- session ---------------------------------------------------------------------------
  async login(action, username, password, displayName) {
    if (action === "signup") await this.api.signUp(username, password, displayName);
    const res = await this.api.login(username, password, store.load("chatd.device"));
    store.save("chatd.device", res.device_id);
    store.save("chatd.session", res);
    await this.start(res);
  }

  async start(session) {
    this.session = session;
    this.me = session.user;
    this.api.token = session.token;
    this.api.users.set(this.me.id, this.me);
    $("login-view").hidden = true;
    $("chat-view").hidden = false;
    $("me").textContent = `${this.me.display_name} (@${this.me.username})`;
    try {
      await this.refreshChannels();
    } catch (err) {
      if (SESSION_OVER.has(err.code)) { this.end(describe(err)); return; }
      view.toast(`Could not load your conversations: ${describe(err)}`);
    }
    for (const p of store.load("chatd.pending") || []) {
      const c = this.channel(p.channelId);
      c.pending.set(p.cmid, { ...p, status: "sending", error: null });
    }
    const wanted = location.hash.slice(1);
    if (wanted && this.channels.has(decodeURIComponent(wanted))) this.currentId = decodeURIComponent(wanted);
    this.conn = new Connection({
      token: session.token,
      resolveUrls: (first) => this.connectUrls(first),
      cursors: () => Object.fromEntries([...this.channels.values()].filter((c) => !c.gone).map((c) => [c.id, c.cursor])),
      onEvent: (f) => this.onEvent(f),
      onReady: (auth, sync) => this.onReady(sync),
      onState: (state, detail) => {
        view.renderConn(state, detail);
        if (state === "online") view.clearToasts("connection");  // what went wrong is over
        else if (detail.error) view.toast(describe(detail.error), "connection");
      },
      onFatal: (err) => this.end(describe(err)),
    });
    this.conn.start();
    this.render();
  }

  /** The login's URLs the first time; afterwards ask the API where to connect (cluster-ready). */
  async connectUrls(first) {
    if (!first) {
      try {
        const r = await this.api.connectUrl();
        for (const k of URL_KEYS) if (r[k]) this.session[k] = r[k];
        store.save("chatd.session", this.session);
      } catch (err) {
        if (SESSION_OVER.has(err.code)) throw err;
        // the API is unreachable: try the shard we know
      }
    }
    const s = this.session;
    const http = s.ws_url.replace(/^ws/, "http").replace(/\/?$/, "/");  // (a session saved before these URLs)
    return { ws_url: s.ws_url, stream_url: s.stream_url || http + "v1/stream",
             poll_url: s.poll_url || http + "v1/poll", frames_url: s.frames_url || http + "v1/frames" };
  }

  async logout() {
    if (this.conn && this.conn.connected) {
      try { await this.conn.request({ type: "logout" }, 3000); } catch (e) { /* fall back to HTTP */ }
    } else {
      try { await this.api.logout(); } catch (e) { /* offline: the token just expires */ }
    }
    this.end("");
  }

  end(message) {
    if (this.conn) this.conn.stop();
    this.conn = null;
    store.drop("chatd.session");
    store.drop("chatd.pending");
    for (const u of this.uploads.values()) u.abort();
    media.forgetMedia();
    this.channels.clear();
    this.currentId = null;
    this.members = null;
    view.clearMessages();
    $("chat-view").hidden = true;
    $("login-view").hidden = false;
    $("login-error").textContent = message;
    $("login-password").value = "";
    $("login-username").focus();
  }

  // ---- channels ----------------------------------------------------------------------------
  channel(id) {
    let c = this.channels.get(id);
    if (!c) {
      c = new Channel(id, this.me.id);
      this.channels.set(id, c);
      if (c.peerId) { this.needUser(c.peerId); this.watchPresence([c.peerId]); }
    }
    return c;
  }

  async refreshChannels() {
    const { channels } = await this.api.channels();
    const fresh = {};
    for (const info of channels) {
      if (!this.channels.has(info.id) && info.last_seq > 0) fresh[info.id] = Math.max(0, info.last_seq - PAGE);
      const c = this.channel(info.id);
      c.name = info.name || c.name;
      c.head = Math.max(c.head, info.last_seq);
      c.readSeq = Math.max(c.readSeq, info.read_seq);
      c.lastAt = Math.max(c.lastAt, info.last_at || 0);
      c.startAt(Math.max(0, info.last_seq - PAGE));  // the last page arrives with the first sync
    }
    if (this.conn && this.conn.connected && Object.keys(fresh).length) {
      // new since this connection's auth: fetch their last page now
      this.conn.request({ type: "sync", cursors: fresh }).catch((err) => this.connError(err));
    }
    this.render();
  }

  /** Refresh the list soon (names of channels we learnt about from a message or a head). */
  refreshSoon() {
    if (this.refreshQueued) return;
    this.refreshQueued = setTimeout(() => {
      this.refreshQueued = null;
      this.refreshChannels().catch((err) => view.toast(describe(err), CONNECTION.has(err.code) ? "connection" : ""));
    }, 300);
  }

  current() { return this.currentId ? this.channels.get(this.currentId) : null; }

  channelTitle(c) {
    if (c.kind === "dm") return this.userName(c.peerId);
    return c.name || "group";
  }

  // A display name is anyone's choice (another user's name, too): shown with the unique
  // @username whenever it differs from it, so nobody can pass for somebody else.
  userName(id) {
    const u = this.api.cachedUser(id);
    if (u) return u.display_name && u.display_name !== u.username ? `${u.display_name} (@${u.username})` : u.username;
    this.needUser(id);
    return `user ${id}`;
  }

  needUser(id) {
    if (this.api.cachedUser(id)) return;
    this.api.fetchUser(id).then(() => this.render(), () => {});
  }

  open(id) {
    this.currentId = id;
    history.replaceState(null, "", `#${encodeURIComponent(id)}`);
    this.scrollToEnd = true;
    if (this.members && this.members.channelId !== id) this.members = null;
    $("members-error").textContent = "";
    this.render();
    this.markRead();
    const c = this.current();
    if (c && c.kind === "dm") this.watchPresence([c.peerId]);
    if (c && c.kind === "group" && !c.gone && !(this.members && this.members.channelId === id)) {
      this.loadMembers(c, false).catch(() => {});  // the header's "3 members"; the panel shows errors
    }
    $("composer-input").focus();
  }

  // ---- the connection's events ------------------------------------------------------------
  onReady(sync) {
    const fresh = {};
    if (sync) {
      for (const [id, head] of Object.entries(sync.heads || {})) {
        const known = this.channels.has(id);
        const c = this.channel(id);
        c.head = Math.max(c.head, head);
        if (!known) { c.startAt(Math.max(0, head - PAGE)); fresh[id] = c.cursor; }
      }
      for (const [id, code] of Object.entries(sync.errors || {})) {
        const c = this.channels.get(id);
        if (c && code === "not_member") c.gone = true;
      }
    }
    if (Object.keys(fresh).length) {
      this.conn.request({ type: "sync", cursors: fresh }).catch((err) => this.connError(err));
    }
    this.refreshSoon();
    for (const c of this.channels.values()) {
      for (const p of c.pending.values()) if (p.status === "sending") this.transmit(c, p);
    }
    const peers = [...this.channels.values()].filter((c) => c.kind === "dm").map((c) => c.peerId);
    this.watchPresence(peers);
    this.markRead();
    this.render();
  }

  onEvent(f) {
    switch (f.type) {
      case "message": this.onMessage(f); break;
      case "typing": {
        const c = this.channels.get(f.channel_id);
        if (!c || f.user_id === this.me.id) break;
        c.typing.set(f.user_id, Date.now() + TYPING_SHOWN_MS);
        setTimeout(() => this.render(), TYPING_SHOWN_MS + 50);
        this.render();
        break;
      }
      case "receipts": {  // coalesced delivered / read positions (docs/protocol.md)
        const c = this.channels.get(f.channel_id);
        if (!c) break;
        for (const [uid, pos] of Object.entries(f.cursors || {})) {
          const u = Number(uid);
          if (u === this.me.id) c.readSeq = Math.max(c.readSeq, pos.read);
          else {
            c.reads.set(u, Math.max(c.reads.get(u) || 0, pos.read));
            c.delivered.set(u, Math.max(c.delivered.get(u) || 0, pos.delivered));
          }
        }
        this.render();
        break;
      }
      case "presence":
        this.presence.set(f.user_id, { status: f.status, last_active_at: f.last_active_at });
        this.render();
        break;
      case "error":
        view.toast(describe(f));
        break;
      default: break;
    }
  }

  onMessage(m) {
    const known = this.channels.has(m.channel_id);
    const c = this.channel(m.channel_id);
    if (!known) {
      c.startAt(Math.max(0, m.seq - 1 - PAGE));
      this.refreshSoon();
    }
    const r = c.accept(m, this.me.id);
    if (r === "gap") { this.fillGap(c); return; }
    if (r !== "new") return;
    if ((m.kind === "member_removed" || m.kind === "member_left") && m.user_id === this.me.id) c.gone = true;
    if ((m.kind === "member_added" || m.kind === "renamed") && known) this.refreshSoon();  // a name changed
    if (m.sender_id === this.me.id && c.pending.delete(m.client_msg_id)) this.savePending();
    if (m.sender_id !== this.me.id) this.needUser(m.sender_id);
    if (m.sender_id !== this.me.id && !m.kind) this.acknowledge(c);
    if (c.id === this.currentId) this.markRead();
    this.render();
  }

  fillGap(c) {
    if (c.syncing || !this.conn || !this.conn.connected) return;
    c.syncing = true;
    this.conn.request({ type: "sync", cursors: { [c.id]: c.cursor } })
      .then((reply) => {
        if (reply.errors && reply.errors[c.id]) { c.gone = true; this.render(); }
      }, (err) => this.connError(err))
      .finally(() => { c.syncing = false; });
  }

  /** Tell the server this device holds the channel up to its cursor (`received`: the sender's ✓✓),
   * at most every 500 ms per channel. */
  acknowledge(c) {
    if (c.ackTimer) return;
    c.ackTimer = setTimeout(() => {
      c.ackTimer = null;
      if (!this.conn || !this.conn.connected || c.cursor <= (c.receivedSeq || 0)) return;
      c.receivedSeq = c.cursor;
      this.conn.request({ type: "received", channel_id: c.id, seq: c.cursor }).catch(() => {});
    }, 500);
  }

  markRead() {
    const c = this.current();
    if (!c || !this.conn || !this.conn.connected || document.visibilityState === "hidden") return;
    if (c.cursor <= c.readSeq) return;
    const seq = c.cursor;
    c.readSeq = seq;
    this.conn.request({ type: "read", channel_id: c.id, seq })
      .then((r) => { c.readSeq = Math.max(c.readSeq, r.seq); this.render(); }, (err) => this.connError(err));
    this.render();
  }

  watchPresence(userIds) {
    const ids = [...new Set(userIds)].filter((u) => u && u !== this.me.id).slice(0, 500);
    if (!ids.length || !this.conn || !this.conn.connected) return;
    this.conn.request({ type: "presence", user_ids: ids }).then((r) => {
      for (const [uid, st] of Object.entries(r.users)) this.presence.set(Number(uid), st);
      this.render();
    }, (err) => this.connError(err));
  }

  connError(err) {
    if (err.code !== "disconnected") view.toast(describe(err), CONNECTION.has(err.code) ? "connection" : "");
  }

  // ---- the message lifecycle (docs/protocol.md): edit, delete, react, reply ---------------------
  /** One lifecycle request on the connection; its row comes back as a `message` and is folded. */
  lifecycle(c, frame) {
    if (!this.conn || !this.conn.connected) { view.toast(describe({ code: "disconnected" })); return; }
    this.conn.request({ ...frame, channel_id: c.id, client_msg_id: uuid() }).catch((err) => this.connError(err));
  }

  startEdit(c, seq) {
    const m = c.row(seq);
    if (!m || m.kind || m.deleted || m.sender_id !== this.me.id) return;
    this.compose = { kind: "edit", seq };
    $("composer-input").value = m.body;
    view.renderComposeBar(this);
    $("composer-input").focus();
  }

  startReply(c, seq) {
    this.compose = { kind: "reply", seq };
    view.renderComposeBar(this);
    $("composer-input").focus();
  }

  cancelCompose() {
    if (this.compose && this.compose.kind === "edit") $("composer-input").value = "";
    this.compose = null;
    view.renderComposeBar(this);
  }

  deleteMessage(c, seq) {
    if (!window.confirm("Delete this message for everyone?")) return;
    this.lifecycle(c, { type: "delete", target_seq: seq });
  }

  toggleReaction(c, seq, emoji) {
    const m = c.row(seq);
    const mine = m && (m.reactions || []).some((r) => r.emoji === emoji && r.me);
    this.lifecycle(c, { type: mine ? "unreact" : "react", target_seq: seq, emoji });
  }

  /** The original of a reply: scrolled to and flashed, if this device holds it. */
  jumpTo(seq) {
    const li = document.querySelector(`#message-list .msg[data-seq="${seq}"]`);
    if (!li) { view.toast("The original message is not loaded; load older messages"); return; }
    li.scrollIntoView({ block: "center" });
    li.classList.add("flash");
    setTimeout(() => li.classList.remove("flash"), 1500);
  }

  // ---- sending -------------------------------------------------------------------------------
  send(text, attached = []) {
    const c = this.current();
    if (!c || (!text.trim() && !attached.length)) return;
    const mode = this.compose;
    this.compose = null;
    view.renderComposeBar(this);
    if (mode && mode.kind === "edit") { this.lifecycle(c, { type: "edit", target_seq: mode.seq, body: text }); return; }
    this.sendTo(c, text, attached, mode && mode.kind === "reply" ? mode.seq : 0);
  }

  sendTo(c, text, attached, replyTo = 0) {
    const p = { cmid: uuid(), channelId: c.id, body: text, status: "sending", error: null, createdAt: Date.now() / 1000,
                media: attached, replyTo };
    c.pending.set(p.cmid, p);
    this.savePending();
    this.scrollToEnd = true;
    this.transmit(c, p);
    this.render();
  }

  transmit(c, p) {
    p.status = "sending";
    p.error = null;
    if (!this.conn || !this.conn.connected) return;  // sent after the reconnect
    const frame = { type: "send", channel_id: c.id, client_msg_id: p.cmid, body: p.body };
    if (p.media && p.media.length) frame.attachments = p.media.map((a) => a.id);
    if (p.replyTo) frame.reply_to = p.replyTo;
    this.conn.request(frame)
      .then((ack) => {
        c.head = Math.max(c.head, ack.seq);
        if (c.cursor >= ack.seq) c.pending.delete(p.cmid);  // its message event came first
        else { p.status = "sent"; p.seq = ack.seq; }
        this.savePending();
        this.render();
      }, (err) => {
        if (err.code === "disconnected") return;  // still "sending": resent after the reconnect
        p.status = "failed";
        p.error = describe(err);
        this.render();
      });
    this.render();
  }

  retry(c, p) { this.scrollToEnd = true; this.transmit(c, p); this.render(); }
  discard(c, p) { c.pending.delete(p.cmid); this.savePending(); this.render(); }

  savePending() {
    const all = [];
    for (const c of this.channels.values()) {
      for (const p of c.pending.values()) {
        if (p.status !== "sent") {
          all.push({ cmid: p.cmid, channelId: c.id, body: p.body, createdAt: p.createdAt, media: p.media || [] });
        }
      }
    }
    try { store.save("chatd.pending", all); } catch (e) { /* storage full: kept in memory only */ }
  }

  // ---- media ---------------------------------------------------------------------------------
  /** Upload each file and send it, as its own message, to the conversation open now. */
  async attach(files) {
    const c = this.current();
    if (!c || c.gone) return;
    if (!this.mediaLimits) {
      try { this.mediaLimits = await this.api.get("/v1/media/limits"); } catch (e) { view.toast(describe(e)); return; }
    }
    for (const file of files) this.uploadOne(c, file, file.name || "file");
  }

  uploadOne(c, file, name) {
    const max = this.mediaLimits.max_bytes;
    if (file.size > max) {
      view.toast(describe({ code: "media_too_large",
                            message: `${name} is ${media.humanSize(file.size)}; the limit is ${media.humanSize(max)}` }));
      return;
    }
    const key = uuid();
    const up = media.upload(this.api, file, name, (f) => { entry.progress = f; view.renderUploads(this); });
    const entry = { name, size: file.size, progress: 0, abort: up.abort };
    this.uploads.set(key, entry);
    view.renderUploads(this);
    up.done.then((m) => { this.sendTo(c, "", [m]); }, (err) => {
      if (err.code !== "cancelled") view.toast(`${name}: ${describe(err)}`);
    }).finally(() => { this.uploads.delete(key); view.renderUploads(this); });
  }

  async toggleRecording() {
    const button = $("record-button");
    if (this.recorder.recording) {
      const blob = await this.recorder.stop();
      button.textContent = "Record";
      button.setAttribute("aria-pressed", "false");
      const ext = blob.type.includes("ogg") ? "ogg" : "webm";
      await this.attach([new File([blob], `voice-${new Date().toISOString().slice(0, 19)}.${ext}`, { type: blob.type })]);
      return;
    }
    try {
      await this.recorder.start();
    } catch (e) {
      view.toast(describe({ code: "no_microphone", message: String(e.message || e) }));
      return;
    }
    button.textContent = "Stop recording";
    button.setAttribute("aria-pressed", "true");
  }

  typing() {
    const c = this.current();
    const now = Date.now();
    if (!c || !this.conn || !this.conn.connected || now - this.lastTypingSent < TYPING_EVERY_MS) return;
    this.lastTypingSent = now;
    this.conn.request({ type: "typing", channel_id: c.id }).catch(() => {});
  }

  async loadOlder() {
    const c = this.current();
    if (!c || !c.hasOlder || c.loadingOlder) return;
    c.loadingOlder = true;
    this.render();
    try {
      const { messages } = await this.api.history(c.id, c.lo, PAGE);
      for (const m of messages) if (m.sender_id !== this.me.id) this.needUser(m.sender_id);
      if (c.prepend(messages, this.me.id)) this.prepended = true;
    } catch (err) {
      view.toast(`Could not load older messages: ${describe(err)}`);
    } finally {
      c.loadingOlder = false;
      this.render();
    }
  }

  // ---- people and groups -------------------------------------------------------------------
  async openDm(username) {
    const { channelId, user } = await this.api.dmWith(username.trim());
    if (!this.channels.has(channelId)) await this.refreshChannels();
    const c = this.channel(channelId);
    c.peerId = user.id;
    this.open(channelId);
  }

  async createGroup(name, usernames) {
    const ids = [];
    for (const u of usernames) {
      try {
        ids.push((await this.api.userByName(u)).id);
      } catch (err) {
        if (err.code === "no_such_user") err.message = `there is no user named '${u}'`;
        throw err;
      }
    }
    const { channel } = await this.api.createGroup(name, ids);
    const c = this.channel(channel.id);
    c.name = channel.name;
    this.members = { channelId: c.id, ids: channel.members, ownerId: channel.owner_id, open: false };
    this.open(c.id);
  }

  async toggleMembers() {
    const c = this.current();
    if (!c) return;
    if (this.members && this.members.channelId === c.id && this.members.open) {
      this.members.open = false;
      this.render();
      return;
    }
    await this.loadMembers(c, true);
  }

  async loadMembers(c, open) {
    const r = await this.api.members(c.id);
    const query = this.members && this.members.channelId === c.id ? this.members.query : "";
    this.api.remember(r.users || []);  // the profiles come with the list: no request per member
    this.members = { channelId: c.id, ids: r.members, ownerId: r.owner_id, open, query };
    this.watchShownMembers();
    this.render();
  }

  /** Presence of the members the panel shows, asked for on demand (big groups get no pushes). */
  watchShownMembers() {
    if (this.members && this.members.open) this.watchPresence(view.shownMembers(this).shown);
  }

  searchMembers(query) {
    if (!this.members) return;
    this.members.query = query;
    clearTimeout(this.searchTimer);
    this.searchTimer = setTimeout(() => this.watchShownMembers(), 300);
    this.render();
  }

  async addMember(username) {
    const c = this.current();
    const user = await this.api.userByName(username.trim());
    const { invited } = await this.api.addMember(c.id, user.id);
    // someone who left on their own is invited back, not added: they join when they accept
    if (invited) view.toast(`${this.userName(user.id)} left this group; they are invited back and join when they accept.`);
    await this.loadMembers(c, true);
  }

  async removeMember(c, uid) {
    $("members-error").textContent = "";
    try {
      await this.api.removeMember(c.id, uid);
      if (uid === this.me.id) { c.gone = true; this.members = null; this.render(); return; }
      await this.loadMembers(c, true);
    } catch (err) {
      $("members-error").textContent = describe(err);
    }
  }

  // ---- rendering -----------------------------------------------------------------------------
  render() {
    if (this.renderQueued) return;
    this.renderQueued = true;
    setTimeout(() => {
      this.renderQueued = false;
      if (!this.me || $("chat-view").hidden) return;
      view.renderChannelList(this);
      view.renderChannel(this);
      view.renderMembers(this);
    }, 0);
  }
}

// ---- wiring -------------------------------------------------------------------------------------
const app = new App();
window.chatd = app;  // for the console (and the browser tests)

/** Run `fn` for a form; its error shows in `errorEl` as readable text. */
function handle(form, errorEl, fn) {
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    errorEl.textContent = "";
    const buttons = form.querySelectorAll("button");
    buttons.forEach((b) => { b.disabled = true; });
    try {
      await fn(ev);
    } catch (err) {
      errorEl.textContent = describe(err);
    } finally {
      buttons.forEach((b) => { b.disabled = false; });
    }
  });
}

handle($("login-form"), $("login-error"), async (ev) => {
  const action = ev.submitter && ev.submitter.value === "signup" ? "signup" : "login";
  const username = $("login-username").value.trim();
  const password = $("login-password").value;
  if (!username || !password) throw { code: "bad_request", message: "enter a username and a password" };
  await app.login(action, username, password, $("login-display").value.trim());
});
handle($("dm-form"), $("sidebar-error"), async () => {
  await app.openDm($("dm-username").value);
  $("dm-username").value = "";
});
handle($("group-form"), $("sidebar-error"), async () => {
  const names = $("group-members").value.split(/[\s,]+/).filter(Boolean);
  await app.createGroup($("group-name").value.trim(), names);
  $("group-name").value = "";
  $("group-members").value = "";
  $("group-details").open = false;
});
handle($("add-member-form"), $("members-error"), async () => {
  await app.addMember($("add-member").value);
  $("add-member").value = "";
});
$("member-search").addEventListener("input", () => app.searchMembers($("member-search").value));
$("members-button").addEventListener("click", () => {
  $("members-error").textContent = "";
  app.toggleMembers().catch((err) => { $("members-error").textContent = describe(err); });
});
$("logout-button").addEventListener("click", () => app.logout());
$("conn-retry").addEventListener("click", () => app.conn && app.conn.retryNow());
$("older-button").addEventListener("click", () => app.loadOlder());
$("messages").addEventListener("scroll", () => { if ($("messages").scrollTop < 30) app.loadOlder(); });
$("back-button").addEventListener("click", () => {
  app.currentId = null;
  history.replaceState(null, "", location.pathname);
  app.render();
});

const input = $("composer-input");
function updateCount() {
  const n = input.value.length;
  const count = $("char-count");
  count.textContent = n > MAX_BODY * 0.9 ? `${n.toLocaleString()} / ${MAX_BODY.toLocaleString()} characters` : "";
  count.classList.toggle("over", n > MAX_BODY);
}
$("attach-button").addEventListener("click", () => $("file-input").click());
$("file-input").addEventListener("change", () => {
  app.attach([...$("file-input").files]);
  $("file-input").value = "";
});
$("record-button").addEventListener("click", () => app.toggleRecording());
$("channel-pane").addEventListener("dragover", (ev) => {
  if (ev.dataTransfer && [...ev.dataTransfer.types].includes("Files")) ev.preventDefault();
});
$("channel-pane").addEventListener("drop", (ev) => {
  if (!ev.dataTransfer || !ev.dataTransfer.files.length) return;
  ev.preventDefault();
  app.attach([...ev.dataTransfer.files]);
});
input.addEventListener("paste", (ev) => {
  const files = ev.clipboardData ? [...ev.clipboardData.files] : [];
  if (files.length) {
    ev.preventDefault();
    app.attach(files);
  }
});
$("composer").addEventListener("submit", (ev) => {
  ev.preventDefault();
  app.send(input.value);
  input.value = "";
  updateCount();
  input.focus();
});
input.addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) {
    ev.preventDefault();
    $("composer").requestSubmit();
  } else if (ev.key === "ArrowUp" && !input.value && app.current()) {  // edit my last message
    const c = app.current();
    const seq = c.lastMine(app.me.id);
    if (seq) { ev.preventDefault(); app.startEdit(c, seq); }
  } else if (ev.key === "Escape" && app.compose) {
    app.cancelCompose();
  }
});
$("compose-bar-cancel").addEventListener("click", () => app.cancelCompose());
input.addEventListener("input", () => { updateCount(); if (input.value) app.typing(); });
document.addEventListener("visibilitychange", () => app.markRead());
setInterval(() => app.render(), 30000);  // "last active 5 min ago" moves on

const saved = store.load("chatd.session");
if (saved && saved.token && saved.expires_at > Date.now() / 1000) {
  app.start(saved);
} else {
  store.drop("chatd.session");
  $("login-view").hidden = false;
  $("login-username").focus();
}
