// The chatd web client: login, then one Connection and the channel state it feeds.
//
// Session: the login answer (token, device id, ws_url, user) lives in sessionStorage: it survives a
// reload of this tab and no other tab sees it, so each tab is one device. Un-acked sends are kept
// there too, and sent again with the same client_msg_id after a reconnect or a reload (the server
// stores each client_msg_id once).

import { Api } from "./api.js";
import { Connection } from "./connection.js";
import { describe, SESSION_OVER } from "./errors.js";
import { Channel, PAGE, uuid } from "./state.js";
import * as view from "./view.js";

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
    this.prepended = false;
    this.lastTypingSent = 0;
    this.refreshQueued = null;
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
      resolveUrl: (first) => this.wsUrl(first),
      cursors: () => Object.fromEntries([...this.channels.values()].filter((c) => !c.gone).map((c) => [c.id, c.cursor])),
      onEvent: (f) => this.onEvent(f),
      onReady: (auth, sync) => this.onReady(sync),
      onState: (state, detail) => { view.renderConn(state, detail); if (detail.error) view.toast(describe(detail.error)); },
      onFatal: (err) => this.end(describe(err)),
    });
    this.conn.start();
    this.render();
  }

  /** The login's ws_url the first time; afterwards ask the API where to connect (cluster-ready). */
  async wsUrl(first) {
    if (!first) {
      try {
        const r = await this.api.connectUrl();
        this.session.ws_url = r.ws_url;
        store.save("chatd.session", this.session);
      } catch (err) {
        if (SESSION_OVER.has(err.code)) throw err;
        // the API is unreachable: try the shard we know
      }
    }
    return this.session.ws_url;
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
      this.refreshChannels().catch((err) => view.toast(describe(err)));
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
      case "read": {
        const c = this.channels.get(f.channel_id);
        if (!c) break;
        if (f.user_id === this.me.id) c.readSeq = Math.max(c.readSeq, f.seq);
        else c.reads.set(f.user_id, Math.max(c.reads.get(f.user_id) || 0, f.seq));
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
    const r = c.accept(m);
    if (r === "gap") { this.fillGap(c); return; }
    if (r !== "new") return;
    if (m.sender_id === this.me.id && c.pending.delete(m.client_msg_id)) this.savePending();
    if (m.sender_id !== this.me.id) this.needUser(m.sender_id);
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
    if (err.code !== "disconnected") view.toast(describe(err));
  }

  // ---- sending -------------------------------------------------------------------------------
  send(text) {
    const c = this.current();
    if (!c || !text.trim()) return;
    const p = { cmid: uuid(), channelId: c.id, body: text, status: "sending", error: null, createdAt: Date.now() / 1000 };
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
    this.conn.request({ type: "send", channel_id: c.id, client_msg_id: p.cmid, body: p.body })
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
        if (p.status !== "sent") all.push({ cmid: p.cmid, channelId: c.id, body: p.body, createdAt: p.createdAt });
      }
    }
    try { store.save("chatd.pending", all); } catch (e) { /* storage full: kept in memory only */ }
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
      if (c.prepend(messages)) this.prepended = true;
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
    await this.api.addMember(c.id, user.id);
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
  }
});
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
