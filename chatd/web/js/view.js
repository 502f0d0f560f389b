// Rendering: state in, DOM out. Everything the server sent is inserted as text (textContent), never
// as HTML. Callers batch changes through `app.render()`.

import { SYSTEM } from "./state.js";
import { attachmentItem, humanSize, openLightbox } from "./media.js";

const $ = (id) => document.getElementById(id);

export function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") e.className = v;
    else if (k === "text") e.textContent = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children) if (c !== null && c !== undefined) e.append(c);
  return e;
}

/**
 * Make `parent`'s children the elements for `items` ({key, sig, build}) with the fewest DOM changes:
 * an item whose key and signature are unchanged keeps its element and is not touched (screen
 * readers announce only what is new in the live log; focus stays where it was).
 */
function reconcile(parent, items) {
  const old = parent._items || new Map();
  const next = new Map();
  const els = items.map(({ key, sig, build }) => {
    const have = old.get(key);
    const e = have && have.sig === sig ? have.el : build();
    next.set(key, { el: e, sig });
    return e;
  });
  els.forEach((e, i) => {
    if (parent.children[i] !== e) parent.insertBefore(e, parent.children[i] || null);
  });
  while (parent.children.length > els.length) parent.lastChild.remove();
  parent._items = next;
}

export function clock(ts) {
  if (!ts) return "";
  const d = new Date(ts * 1000);
  const now = new Date();
  const hm = d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
  return d.toDateString() === now.toDateString() ? hm : `${d.toLocaleDateString()} ${hm}`;
}

export function ago(ts) {
  if (!ts) return "never seen";
  const s = Math.max(0, Date.now() / 1000 - ts);
  if (s < 60) return "last active just now";
  if (s < 3600) return `last active ${Math.floor(s / 60)} min ago`;
  if (s < 86400) return `last active ${Math.floor(s / 3600)} h ago`;
  return `last active ${Math.floor(s / 86400)} d ago`;
}

export function presenceText(p) {
  if (!p) return "";
  return p.status === "online" ? "online" : ago(p.last_active_at);
}

export function renderChannelList(app) {
  const list = $("channel-list");
  const chans = [...app.channels.values()].filter((c) => !c.gone)
    .sort((a, b) => b.activityAt() - a.activityAt() || a.id.localeCompare(b.id));
  $("no-channels").hidden = chans.length > 0;
  list.replaceChildren(...chans.map((c) => {
    const last = c.last();
    const mine = last && (last.mine || last.sender_id === app.me.id);
    const preview = last ? `${mine ? "You: " : ""}${(last.body || attachmentsText(last.attachments)).slice(0, 80)}`
      : "no messages yet";
    const p = c.kind === "dm" ? app.presence.get(c.peerId) : null;
    const name = el("span", { class: "ch-name" });
    if (c.kind === "dm") {
      name.append(el("span", { class: `dot ${p && p.status === "online" ? "online" : ""}`,
                               role: "img", "aria-label": p && p.status === "online" ? "online" : "offline" }));
    }
    name.append(app.channelTitle(c));
    const unread = c.id === app.currentId ? 0 : c.unread;
    return el("li", {},
      el("button", { type: "button", "data-channel": c.id, "aria-current": c.id === app.currentId ? "true" : null,
                     onclick: () => app.open(c.id) },
        name,
        el("span", { class: "ch-time", text: clock(c.activityAt()) }),
        el("span", { class: "ch-last", text: preview }),
        unread ? el("span", { class: "badge", "aria-label": `${unread} unread`, text: String(unread) }) : null));
  }));
}

export function renderChannel(app) {
  const c = app.current();
  $("empty-pane").hidden = !!c;
  $("channel-view").hidden = !c;
  document.getElementById("chat-view").classList.toggle("in-channel", !!c);
  if (!c) return;
  $("channel-title").textContent = app.channelTitle(c);
  let sub = "";
  if (c.gone) sub = "you are no longer a member";
  else if (c.kind === "dm") sub = presenceText(app.presence.get(c.peerId));
  else if (app.members && app.members.channelId === c.id) sub = `${app.members.ids.length} members`;
  $("channel-sub").textContent = sub;
  $("members-button").hidden = c.kind !== "group";

  const box = $("messages");
  const fromBottom = box.scrollHeight - box.scrollTop - box.clientHeight;
  const keepBottom = fromBottom < 40 || app.scrollToEnd;
  const prevHeight = box.scrollHeight;
  const prevTop = box.scrollTop;
  $("older-button").hidden = !c.hasOlder;
  $("older-button").disabled = c.loadingOlder;
  $("older-button").textContent = c.loadingOlder ? "Loading…" : "Load older messages";

  const seen = c.seen(app.me.id);
  // lifecycle rows are folded into their messages (state.js); membership rows show as a line
  const items = c.messages.filter((m) => !m.kind || SYSTEM.has(m.kind)).map((m) => {
    const mine = m.sender_id === app.me.id;
    const who = mine ? "You" : app.userName(m.sender_id);
    if (m.kind) {
      const text = systemText(app, m);
      return { key: `${c.id} ${m.seq}`, sig: text, build: () => el("li", { class: "msg system", "data-seq": m.seq, text }) };
    }
    let receipt = null;
    if (seen && seen.seq === m.seq) {
      const names = seen.readers.map((u) => app.userName(u)).join(", ");
      receipt = c.kind === "dm" ? "Seen" : `Seen by ${seen.readers.length} (${names})`;
    } else if (c.kind === "dm" && mine && m.seq === c.lastMine(app.me.id) && (!seen || seen.seq < m.seq)) {
      receipt = (c.delivered.get(c.peerId) || 0) >= m.seq ? "✓✓" : "✓";  // stored; on their device
    }
    const quoted = m.reply_to ? c.row(m.reply_to) : null;
    const quote = m.reply_to ? quoteText(app, m, quoted) : "";
    return { key: `${c.id} ${m.seq}`, sig: `${who}|${receipt}|${m.state_seq || 0}|${quote}`,
             build: () => messageItem(app, c, m, mine, who, receipt, quote) };
  });
  for (const p of c.pending.values()) {
    items.push({ key: `${c.id} ${p.cmid}`, sig: `${p.status}|${p.error}`, build: () => pendingItem(app, c, p) });
  }
  reconcile($("message-list"), items);
  if (keepBottom) box.scrollTop = box.scrollHeight;
  else if (app.prepended) box.scrollTop = prevTop + (box.scrollHeight - prevHeight);
  app.scrollToEnd = false;
  app.prepended = false;

  const typing = c.typingUsers(Date.now()).filter((u) => u !== app.me.id).map((u) => app.userName(u));
  $("typing").textContent = typing.length === 0 ? "" :
    `${typing.join(", ")} ${typing.length === 1 ? "is" : "are"} typing…`;
}

/** A message's attachments, as shown in the conversation list ("Photo", "Voice message", a file name). */
export function attachmentsText(list) {
  if (!list || !list.length) return "";
  const one = (a) => (a.kind === "image" ? "Photo" : a.kind === "audio" ? "Voice message" : a.kind === "video" ? "Video"
    : a.name);
  return list.map(one).join(", ");
}

function attachments(app, list) {
  if (!list || !list.length) return null;
  return el("div", { class: "atts" }, ...list.map((a) => attachmentItem(app.api, a, (x) => openLightbox(app.api, x))));
}

function systemText(app, m) {
  const who = m.sender_id === app.me.id ? "You" : app.userName(m.sender_id);
  const whom = m.user_id === app.me.id ? "you" : app.userName(m.user_id);
  if (m.kind === "renamed") return `${who} renamed the group to “${m.name}”`;
  if (m.kind === "member_added") return `${who} added ${whom}`;
  if (m.kind === "member_left") return `${m.user_id === app.me.id ? "You" : app.userName(m.user_id)} left`;
  return `${who} removed ${whom}`;
}

const PICKER = ["👍", "❤️", "😂", "🎉"];

/** A reply's quote: from this device's own copy of the original (current), else the row's excerpt. */
function quoteText(app, m, original) {
  const src = original && !original.kind ? { sender_id: original.sender_id, deleted: !!original.deleted,
                                             excerpt: original.body.slice(0, 100) } : m.reply;
  if (!src) return "a message";
  const who = src.sender_id === app.me.id ? "You" : app.userName(src.sender_id);
  return src.deleted ? `${who}: deleted message` : `${who}: ${src.excerpt}`;
}

function messageItem(app, c, m, mine, who, receipt, quote) {
  const li = el("li", { class: `msg${mine ? " mine" : ""}${m.deleted ? " deleted" : ""}`, "data-seq": m.seq,
                        "data-cmid": m.client_msg_id, "data-status": mine ? "sent" : null },
    el("div", { class: "meta" }, el("span", { class: "who", text: who }), el("time", { text: clock(m.created_at) }),
      m.edited_at && !m.deleted ? el("span", { class: "edited", text: "(edited)" }) : null));
  if (m.reply_to) {
    li.append(el("button", { type: "button", class: "quote", "data-reply-to": m.reply_to, text: quote,
                             onclick: () => app.jumpTo(m.reply_to) }));
  }
  if (!m.deleted) { const atts = attachments(app, m.attachments); if (atts) li.append(atts); }
  if (m.deleted || m.body) li.append(el("div", { class: "body", text: m.deleted ? "Message deleted" : m.body }));
  if (m.reactions && m.reactions.length) {
    li.append(el("div", { class: "reactions" }, ...m.reactions.map((r) =>
      el("button", { type: "button", class: `reaction${r.me ? " me" : ""}`, "data-emoji": r.emoji,
                     "aria-pressed": r.me ? "true" : "false", text: `${r.emoji} ${r.count}`,
                     onclick: () => app.toggleReaction(c, m.seq, r.emoji) }))));
  }
  if (!m.deleted) {
    const actions = el("div", { class: "actions" },
      ...PICKER.map((e) => el("button", { type: "button", class: "link react", "data-emoji": e,
                                          "aria-label": `React ${e}`, text: e,
                                          onclick: () => app.toggleReaction(c, m.seq, e) })),
      el("button", { type: "button", class: "link reply", text: "Reply", onclick: () => app.startReply(c, m.seq) }));
    if (mine) {
      actions.append(el("button", { type: "button", class: "link edit", text: "Edit", onclick: () => app.startEdit(c, m.seq) }),
        el("button", { type: "button", class: "link delete", text: "Delete", onclick: () => app.deleteMessage(c, m.seq) }));
    }
    li.append(actions);
  }
  if (receipt) li.append(el("div", { class: "receipt", text: receipt }));
  return li;
}

/** The bar over the composer: what the next Enter does (edit a message, or reply to one). */
export function renderComposeBar(app) {
  const mode = app.compose;
  $("compose-bar").hidden = !mode;
  if (!mode) return;
  const c = app.current();
  const m = c && c.row(mode.seq);
  $("compose-bar-text").textContent = mode.kind === "edit" ? "Editing your message"
    : `Replying to ${m && !m.kind ? quoteText(app, m, m) : "a message"}`;
}

function pendingItem(app, c, p) {
  const status = el("div", { class: "status" });
  if (p.status === "failed") {
    status.append(`Failed — ${p.error} `,
      el("button", { type: "button", class: "link retry", onclick: () => app.retry(c, p) }, "Retry"),
      el("button", { type: "button", class: "link discard", onclick: () => app.discard(c, p) }, "Discard"));
  } else {
    status.textContent = p.status === "sent" ? "Sent" : "Sending…";
  }
  return el("li", { class: "msg mine pending", "data-cmid": p.cmid, "data-status": p.status },
    el("div", { class: "meta" }, el("span", { class: "who", text: "You" })),
    attachments(app, p.media),
    p.body ? el("div", { class: "body", text: p.body }) : null,
    status);
}

/** The uploads in progress, each with its progress bar and a cancel button. */
export function renderUploads(app) {
  const list = $("uploads");
  const ups = [...app.uploads.values()];
  list.hidden = ups.length === 0;
  list.replaceChildren(...ups.map((u) => el("li", { class: "upload", "data-upload": u.name },
    el("span", { class: "upload-name", text: `${u.name} (${humanSize(u.size)})` }),
    el("progress", { max: "1", value: String(u.progress), "aria-label": `Uploading ${u.name}` }),
    el("button", { type: "button", class: "link upload-cancel", onclick: () => u.abort() }, "Cancel"))));
}

/** Forget the rendered messages (after a logout). */
export function clearMessages() {
  const list = $("message-list");
  list._items = null;
  list.replaceChildren();
}

/** At most this many members are drawn at once; the search finds the others. */
export const MEMBERS_SHOWN = 200;

/** The members the panel shows: those matching its search (name, @username or id), at most
 *  MEMBERS_SHOWN; and how many match. */
export function shownMembers(app) {
  const m = app.members;
  const q = (m.query || "").trim().toLowerCase();
  const matches = q ? m.ids.filter((uid) => `${app.userName(uid)} ${uid}`.toLowerCase().includes(q)) : m.ids;
  return { shown: matches.slice(0, MEMBERS_SHOWN), matching: matches.length };
}

export function renderMembers(app) {
  const c = app.current();
  const m = app.members;
  const open = !!(c && m && m.channelId === c.id && m.open);
  $("members-panel").hidden = !open;
  $("members-button").setAttribute("aria-expanded", String(open));
  if (!open) return;
  const iOwn = m.ownerId === app.me.id;
  $("add-member-form").hidden = !iOwn;
  const search = $("member-search");
  if (search.value !== (m.query || "")) search.value = m.query || "";  // (another group's list)
  const { shown, matching } = shownMembers(app);
  const total = m.ids.length.toLocaleString("en-US");
  $("member-count").textContent = matching === m.ids.length && shown.length === matching ? `${total} members`
    : `${shown.length.toLocaleString("en-US")} shown of ${matching.toLocaleString("en-US")} matching (${total} members)`;
  $("member-list").replaceChildren(...shown.map((uid) => {
    const p = uid === app.me.id ? { status: app.conn && app.conn.connected ? "online" : "offline" } : app.presence.get(uid);
    const label = `${app.userName(uid)}${uid === m.ownerId ? " (owner)" : ""}`;
    const li = el("li", { "data-user": uid },
      el("span", { class: `dot ${p && p.status === "online" ? "online" : ""}`, role: "img",
                   "aria-label": p && p.status === "online" ? "online" : "offline" }),
      el("span", { text: label, title: presenceText(p) }));
    if (uid === app.me.id || iOwn) {
      li.append(el("button", { type: "button", class: "secondary",
                               "aria-label": uid === app.me.id ? "Leave the group" : `Remove ${app.userName(uid)}`,
                               onclick: () => app.removeMember(c, uid) }, uid === app.me.id ? "Leave" : "Remove"));
    }
    return li;
  }));
}

const TRANSPORT_NAMES = { ws: "WebSocket", sse: "SSE", poll: "long polling" };

export function renderConn(state, detail) {
  const t = $("conn-transport");
  if (detail.transport) {
    t.dataset.transport = detail.transport;
    t.textContent = state === "stopped" ? "" : `via ${TRANSPORT_NAMES[detail.transport]}`;
  } else if (state === "stopped") t.textContent = "";
  const s = $("conn-status");
  s.dataset.state = state;
  const retry = $("conn-retry");
  retry.hidden = state !== "offline";
  if (state === "online") s.textContent = "Connected";
  else if (state === "connecting") s.textContent = "Connecting…";
  else if (state === "offline") {
    const why = detail.reason ? `${detail.reason}; ` : "";
    s.textContent = `Offline — ${why}reconnecting in ${Math.max(1, Math.round(detail.retryInS || 1))} s`;
  } else s.textContent = "";
}

/** A notice for 10 s; `kind` "connection" marks one that `clearToasts` ends once connected again. */
export function toast(text, kind = "") {
  const box = $("toasts");
  for (const old of box.children) if (old.dataset.text === text) old.remove();  // the same notice once
  const t = el("div", { class: "toast", "data-kind": kind || null, "data-text": text }, el("span", { text }),
    el("button", { type: "button", "aria-label": "Dismiss", onclick: () => t.remove() }, "×"));
  box.append(t);
  while (box.children.length > 4) box.firstChild.remove();
  setTimeout(() => t.remove(), 10000);
}

/** Remove the notices of a `kind` (the connection's, once it is back). */
export function clearToasts(kind) {
  for (const t of [...$("toasts").children]) if (t.dataset.kind === kind) t.remove();
}
