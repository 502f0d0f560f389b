// What the client knows about its channels: no DOM, no I/O.
//
// Per channel the client holds a contiguous window of messages, seqs lo .. cursor (docs/protocol.md
// §6): `cursor` is the highest seq held with no gap below it down to `lo`, and it is what `auth`/`sync`
// send on reconnect. A live message at cursor + 1 extends the window; at or below the cursor it is a
// duplicate and ignored; above cursor + 1 it is a gap, which the caller fills with `sync`. Older pages
// (history) are prepended below `lo`. Own sends not yet seen as a `message` are `pending`, keyed by
// client_msg_id, with status "sending" | "sent" | "failed".

export const PAGE = 30;

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
    this.reads = new Map();    // other user id -> their read seq (from `read` events)
    this.typing = new Map();   // user id -> until (ms)
    this.syncing = false;
    this.loadingOlder = false;
    this.gone = false;         // removed from the group
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
  accept(m) {
    if (m.seq <= this.cursor) return "dup";
    if (m.seq > this.cursor + 1) return "gap";
    this.messages.push(m);
    this.cursor = m.seq;
    this.head = Math.max(this.head, m.seq);
    this.lastAt = Math.max(this.lastAt, m.created_at || 0);
    this.typing.delete(m.sender_id);
    return "new";
  }

  /** Prepend an older page (ascending); keeps only the part that ends right below `lo`. */
  prepend(msgs) {
    const older = msgs.filter((m) => m.seq < this.lo);
    if (older.length === 0 || older[older.length - 1].seq !== this.lo - 1) return 0;
    this.messages = older.concat(this.messages);
    this.lo = older[0].seq;
    return older.length;
  }

  /** The newest thing to show in the channel list: a pending send or the last message. */
  last() {
    let latest = this.messages.length ? this.messages[this.messages.length - 1] : null;
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

  /** {seq, readers} of my newest message that others have read, or null. */
  seen(myId) {
    const readers = [...this.reads].filter(([uid]) => uid !== myId);
    for (let i = this.messages.length - 1; i >= 0; i--) {
      const m = this.messages[i];
      if (m.sender_id !== myId) continue;
      const who = readers.filter(([, seq]) => seq >= m.seq).map(([uid]) => uid);
      if (who.length) return { seq: m.seq, readers: who };
    }
    return null;
  }
}
