// Server error codes (docs/protocol.md, README's HTTP table) as sentences a person can act on.

const TEXT = {
  bad_request: "The request was not accepted",
  bad_frame: "The client sent a frame the server could not read",
  unknown_type: "The server does not know this request",
  bad_field: "A field of the request was wrong",
  frame_too_large: "That is too large for the server",
  body_too_long: "Message too long",
  not_authenticated: "You are not logged in",
  already_authenticated: "Already logged in on this connection",
  invalid_token: "Your session is no longer valid; please log in again",
  token_expired: "Your session expired; please log in again",
  bad_credentials: "Wrong username or password",
  username_taken: "That username is taken",
  not_member: "You are not a member of this conversation",
  no_such_channel: "This conversation does not exist",
  no_such_user: "No such user",
  forbidden: "You may not do that",
  group_full: "The group is full",
  too_many_groups: "You made many groups lately; wait before making another",
  not_invited: "You need an invitation from the group's owner to join it again",
  push_token_taken: "This device's notifications belong to another account that is still logged in here",
  rate_limited: "Too many requests; slow down",
  unavailable: "The server is temporarily unavailable; try again",
  internal: "The server hit a bug",
  network: "Cannot reach the chatd server",
  timeout: "The server did not answer in time",
  disconnected: "The connection was lost",
  not_found: "Not found",
  no_such_message: "That message does not exist",
  not_author: "Only its author may do that",
  edit_window_closed: "It is too late to edit that message",
  message_deleted: "That message was deleted",
  bad_emoji: "That is not one emoji",
  too_many_reactions: "That message has too many different reactions",
  no_such_media: "That file is not available (any more)",
  media_too_large: "That file is too large to send",
  media_quota: "You have sent too many files this hour; try again later",
  bad_attachment: "That attachment cannot be sent",
  cancelled: "Cancelled",
  no_microphone: "The microphone is not available",
};

/** A readable sentence for an error with `code` and server `message`. */
export function describe(err) {
  const code = (err && err.code) || "internal";
  const base = TEXT[code] || `Error (${code})`;
  // (a detail that only repeats the sentence, whatever its case, is not said twice)
  const msg = err && typeof err.message === "string" ? err.message : "";
  const detail = msg && !base.toLowerCase().includes(msg.toLowerCase()) ? msg : "";
  let text = detail ? `${base}: ${detail}` : base;
  if ((code === "rate_limited" || code === "too_many_groups" || code === "media_quota") && err.retryAfterS) text += ` (retry in ${err.retryAfterS} s)`;
  if (code === "rate_limited" && err.retry_after_ms) text += ` (retry in ${Math.ceil(err.retry_after_ms / 1000)} s)`;
  return text;
}

/** Codes that say the server could not be reached: their notices end once connected again. */
export const CONNECTION = new Set(["network", "timeout", "disconnected", "unavailable"]);

/** Codes after which the session is over: back to the login screen. */
export const SESSION_OVER = new Set(["invalid_token", "token_expired", "not_authenticated"]);
