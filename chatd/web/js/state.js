// What the client knows about its channels: no DOM, no I/O.
//
// Per channel the client holds a contiguous window of messages, seqs lo .. cursor (docs/protocol.md
// §6): `cursor` is the highest seq held with no gap below it down to `lo`, and it is what `auth`/`sync`
// send on reconnect. A live message at cursor + 1 extends the window; at or below the cursor it is a
// duplicate and ignored; above cursor + 1 it is a gap, which the caller fills with `sync`. Older pages
// (history) are prepended below `lo`. Own sends not yet seen as a `message` are `pending`, keyed by
// client_msg_id, with status "sending" | "sent" | "failed".

//
// Lifecycle rows (docs/protocol.md, "The message lifecycle") are rows of the window like messages
// (the window stays contiguous); an edit, delete, react or unreact is folded into the message it
// targets (rule 2 of the page), or set aside until that message is loaded (rule 3).

export const PAGE = 30;
export const TARGETED = new Set(["edit", "delete", "react", "unreact"]);
export const SYSTEM = new Set(["member_added", "member_removed", "member_left", "renamed"]);
const ASIDE_MAX = 500;

export function uuid() {
  if (crypto.randomUUID) return crypto.randomUUID();  // secure contexts only (https, localhost)
  const b = crypto.getRandomValues(new Uint8Array(16));
  b[6] = (b[6] & 0x0f) | 0x40;
  b[8] = (b[8] & 0x3f) | 0x80;
  const h = [...b].map((x) => x.toString(16).padStart(2, "0")).join("");
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}

export class Channel {
  constructor(id, myId) {
    this.id = id;
    this.kind = id.startsWith("dm:") ? "dm" : "group";
    this.name = "";
    this.peerId = null;
    if (this.kind === "dm") {
      const [a, b] = id.slice(3).split(":").map(Number);
      this.peerId = a === myId ? b : a;
    }
    this.head = 0;        // last seq of the channel as far as we know
    this.readSeq = 0;     // my read position
    this.lastAt = 0;
    this.messages = [];   // ascending, contiguous: lo .. cursor
    this.cursor = 0;
    this.lo = 1;
    this.pending = new Map();  // client_msg_id -> {cmid, body, status, error, seq, createdAt}
    this.reads = new Map();    // other user id -> their read seq (from `receipts` events)
    this.delivered = new Map();  // other user id -> the highest seq their devices hold
    this.typing = new Map();   // user id -> until (ms)
    this.syncing = false;
    this.loadingOlder = false;
    this.gone = false;         // removed from the group
    this.aside = new Map();    // target seq -> lifecycle rows whose message is not held yet
  }

  /** The row `seq` if held. */
  row(seq) {
    const i = seq - this.lo;
    return i >= 0 && i < this.messages.length ? this.messages[i] : null;
  }

  /** Fold a lifecycle row into its target, or set it aside (docs/protocol.md, rules 2 and 3). */
  fold(ev, myId) {
    if (!TARGETED.has(ev.kind)) return;
    const i = ev.target_seq - this.lo;
    const m = i >= 0 && i < this.messages.length ? this.messages[i] : null;
    if (!m) {
      const list = this.aside.get(ev.target_seq) || [];
      list.push(ev);
      this.aside.set(ev.target_seq, list);
      if (this.aside.size > ASIDE_MAX) this.aside.delete(this.aside.keys().next().value);
      return;
    }
    if (m.kind || ev.redacted || ev.seq <= (m.state_seq || m.seq)) return;
    const next = { ...m, state_seq: ev.seq, reactions: (m.reactions || []).map((r) => ({ ...r })) };
    if (ev.kind === "edit") {
      next.body = ev.body;
      next.edited_at = ev.created_at;
    } else if (ev.kind === "delete") {
      next.body = "";
      delete next.edited_at;
      next.reactions = [];
      next.deleted = { by: ev.sender_id, at: ev.created_at };
    } else {
      let r = next.reactions.find((x) => x.emoji === ev.emoji);
      if (!r) { r = { emoji: ev.emoji, count: 0, me: false }; next.reactions.push(r); }
      r.count = ev.count;
      if (ev.sender_id === myId) r.me = ev.kind === "react";
      next.reactions = next.reactions.filter((x) => x.count > 0);
    }
    this.messages[i] = next;
  }

  /** Apply the rows set aside for messages now held. */
  foldAside(myId) {
    for (const [seq, rows] of [...this.aside]) {
      if (!this.row(seq)) continue;
      this.aside.delete(seq);
      rows.sort((a, b) => a.seq - b.seq).forEach((ev) => this.fold(ev, myId));
    }
  }

  /** Start an empty window above `cursor` (only while nothing is held). */
  startAt(cursor) {
    if (this.messages.length === 0) {
      this.cursor = cursor;
      this.lo = cursor + 1;
    }
  }

  get unread() { return Math.max(0, this.head - this.readSeq); }
  get hasOlder() { return this.lo > 1; }

  /** "new" (appended), "dup" (already held) or "gap" (missing messages before it). */
  accept(m, myId) {
    if (m.seq <= this.cursor) return "dup";
    if (m.seq > this.cursor + 1) return "gap";
    this.messages.push(m);
    if (m.kind) this.fold(m, myId);
    else if (this.aside.has(m.seq)) this.foldAside(myId);
    this.cursor = m.seq;
    this.head = Math.max(this.head, m.seq);
    this.lastAt = Math.max(this.lastAt, m.created_at || 0);
    this.typing.delete(m.sender_id);
    return "new";
  }

  /** Prepend an older page (ascending); keeps only the part that ends right below `lo`. */
  prepend(msgs, myId) {
    const older = msgs.filter((m) => m.seq < this.lo);
    if (older.length === 0 || older[older.length - 1].seq !== this.lo - 1) return 0;
    this.messages = older.concat(this.messages);
    this.lo = older[0].seq;
    for (const m of older) if (m.kind) this.fold(m, myId);
    this.foldAside(myId);
    return older.length;
  }

  /** The newest thing to show in the channel list: a pending send or the last message. */
  last() {
    let latest = null;
    for (let i = this.messages.length - 1; i >= 0 && !latest; i--) if (!this.messages[i].kind) latest = this.messages[i];
    for (const p of this.pending.values()) {
      if (!latest || p.createdAt >= (latest.created_at || 0)) latest = { body: p.body, mine: true, created_at: p.createdAt };
    }
    return latest;
  }

  activityAt() {
    const l = this.last();
    return Math.max(this.lastAt, l ? l.created_at || 0 : 0);
  }

  typingUsers(now) {
    return [...this.typing].filter(([, until]) => until > now).map(([id]) => id);
  }

  /** The seq of my newest message (0: none held). */
  lastMine(myId) {
    for (let i = this.messages.length - 1; i >= 0; i--) {
      const m = this.messages[i];
      if (m.sender_id === myId && !m.kind) return m.seq;
    }
    return 0;
  }

  /** {seq, readers} of my newest message that others have read, or null. */
  seen(myId) {
    const readers = [...this.reads].filter(([uid]) => uid !== myId);
    for (let i = this.messages.length - 1; i >= 0; i--) {
      const m = this.messages[i];
      if (m.sender_id !== myId || m.kind) continue;
      const who = readers.filter(([, seq]) => seq >= m.seq).map(([uid]) => uid);
      if (who.length) return { seq: m.seq, readers: who };
    }
    return null;
  }
}
