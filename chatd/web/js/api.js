// HTTP API client (README "HTTP API"). Every failure becomes an ApiError with the server's stable
// code (docs/protocol.md) and message; a network failure is code "network". Nothing is retried here:
// callers decide (the UI shows the error, the connection backs off).

export class ApiError extends Error {
  constructor(code, message, status = 0, retryAfterS = null) {
    super(message);
    this.code = code;
    this.status = status;
    this.retryAfterS = retryAfterS;
  }
}

async function http(method, path, { body, token } = {}) {
  const headers = {};
  if (token) headers.Authorization = `Bearer ${token}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let resp;
  try {
    resp = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  } catch (e) {
    throw new ApiError("network", "cannot reach the chatd server");
  }
  let data = null;
  try { data = await resp.json(); } catch (e) { /* not JSON: handled below */ }
  if (!resp.ok) {
    const err = (data && data.error) || {};
    throw new ApiError(err.code || `http_${resp.status}`, err.message || resp.statusText, resp.status,
                       resp.headers.get("Retry-After"));
  }
  return data;
}

export class Api {
  constructor() { this.token = null; this.users = new Map(); }

  signUp(username, password, displayName) {
    const body = { username, password };
    if (displayName) body.display_name = displayName;
    return http("POST", "/v1/users", { body });
  }
  login(username, password, deviceId) {
    const body = { username, password };
    if (deviceId) body.device_id = deviceId;
    return http("POST", "/v1/login", { body });
  }
  get(path) { return http("GET", path, { token: this.token }); }
  logout() { return http("POST", "/v1/logout", { token: this.token }); }
  connectUrl() { return this.get("/v1/connect"); }
  /** Every channel of mine: GET /v1/channels page by page (its `next` cursor) until the last. */
  async channels() {
    const channels = [];
    let cursor = null;
    do {
      const page = await this.get(`/v1/channels${cursor ? `?cursor=${encodeURIComponent(cursor)}` : ""}`);
      channels.push(...page.channels);
      cursor = page.next;
    } while (cursor);
    return { channels };
  }
  members(channelId) { return this.get(`/v1/channels/${encodeURIComponent(channelId)}/members`); }
  history(channelId, before, limit) {
    return this.get(`/v1/channels/${encodeURIComponent(channelId)}/messages?before=${before}&limit=${limit}`);
  }
  async userByName(username) {
    const { user } = await this.get(`/v1/users/by-name/${encodeURIComponent(username)}`);
    this.users.set(user.id, user);
    return user;
  }
  async dmWith(username) {
    const user = await this.userByName(username);
    const { channel_id } = await this.get(`/v1/dm/${user.id}`);
    return { channelId: channel_id, user };
  }
  createGroup(name, memberIds) {
    return http("POST", "/v1/groups", { token: this.token, body: { name, members: memberIds } });
  }
  addMember(channelId, userId) {
    return http("POST", `/v1/channels/${encodeURIComponent(channelId)}/members`,
                { token: this.token, body: { user_id: userId } });
  }
  removeMember(channelId, userId) {
    return http("DELETE", `/v1/channels/${encodeURIComponent(channelId)}/members/${userId}`, { token: this.token });
  }

  /** Keep profiles that came with another answer (a group's member list). */
  remember(users) { for (const u of users) this.users.set(u.id, u); }
  /** The cached user, or null; `fetchUser` fills the cache. */
  cachedUser(id) { return this.users.get(id) || null; }
  async fetchUser(id) {
    if (!this.users.has(id)) {
      const { user } = await this.get(`/v1/users/${id}`);
      this.users.set(id, user);
    }
    return this.users.get(id);
  }
}
