// The server's APIs as the page uses them: the model list and the WebSocket generation API.

// A browser cannot send headers with a WebSocket: the key travels as a subprotocol instead.
const SUBPROTOCOL = "swarm-chat";
const KEY_SUBPROTOCOL_PREFIX = "swarm-chat.key.";

let apiKey = null;

/** Sends `key` with every later request (null: none). */
export function useApiKey(key) {
  apiKey = key || null;
}

function base64url(text) {
  const binary = String.fromCharCode(...new TextEncoder().encode(text));
  return btoa(binary).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
}

/**
 * An error reply, or a failure of the connection itself (code "connection_lost"). `retryAfter`:
 * the seconds the server asks to wait before trying again, when it says.
 */
export class ChatError extends Error {
  constructor(message, code, retryable, retryAfter) {
    super(message);
    this.code = code;
    this.retryable = retryable;
    this.retryAfter = retryAfter;
  }
}

/** The declared models, in the server's order (those it cannot serve have `available: false`). */
export async function fetchModels() {
  let body;
  try {
    const headers = apiKey ? { Authorization: `Bearer ${apiKey}` } : {};
    const response = await fetch("api/v1/models", { cache: "no-store", headers });
    body = await response.json();
  } catch {
    throw new ChatError("Cannot reach the server to list its models.", "connection_lost", true);
  }
  if (!body.ok) throw new ChatError(body.traceback, body.code, body.retryable);
  return body.models;
}

function socketUrl() {
  const url = new URL("api/v2/generate", window.location.href);
  url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
  return url.href;
}

function connect() {
  const protocols = apiKey ? [SUBPROTOCOL, KEY_SUBPROTOCOL_PREFIX + base64url(apiKey)] : [];
  return new WebSocket(socketUrl(), protocols);
}

// The close code that tells the server the conversation is over (any other close, or a dropped
// connection, leaves a resumable session waiting for the page to come back).
const NORMAL_CLOSURE = 1000;

/**
 * One inference session, held by a WebSocket connection. The session is resumable: when the
 * connection drops, the next request (or the reply in flight) reconnects and resumes it, and
 * the server sends again the replies the page missed. Only if that fails does the request fail
 * with "connection_lost", and the caller replays the conversation in a new session.
 */
export class ChatSocket {
  constructor(socket, maxLength) {
    this.maxLength = maxLength;
    // The request in flight: onReply(reply) handles a reply and says whether it was the last.
    this.waiting = null;
    this.closed = false;
    this.resumeWith = null; // {session_id, resume_token} once the session is open
    this.lastSeq = 0; // the last reply received, so a resumed session sends only later ones
    this.stopAfterResume = false; // a stop asked for while the connection was being restored
    this._attach(socket);
  }

  _attach(socket) {
    this.socket = socket;
    this.dropped = false;
    socket.onmessage = (event) => this._receive(JSON.parse(event.data));
    socket.onclose = () => {
      this.dropped = true;
      const lost = new ChatError("Lost the connection to the server.", "connection_lost", true);
      if (this.waiting && this.waiting.resuming) {
        this._fail(lost); // the attempt to resume failed too
      } else if (this.waiting && this.resumeWith) {
        this._resume().catch((error) => this._fail(error));
      } else if (!this.resumeWith) {
        this.closed = true;
        this._fail(lost);
      }
    };
  }

  /**
   * Connects and opens a session on `model` that may hold `maxLength` tokens. On a full server
   * the open waits in line: `onQueued(position)` hears of its place (1: next) each time it
   * changes. Aborting `signal` before the session opens gives up (and the place in line).
   */
  static open(model, maxLength, { onQueued, signal } = {}) {
    return new Promise((resolve, reject) => {
      const socket = connect();
      const chatSocket = new ChatSocket(socket, maxLength);
      const giveUp = () => chatSocket.close();
      signal?.addEventListener("abort", giveUp);
      chatSocket.waiting = {
        onQueued,
        onReply: (reply) => {
          signal?.removeEventListener("abort", giveUp); // the session is the caller's now
          chatSocket.resumeWith = { session_id: reply.session_id, resume_token: reply.resume_token };
          resolve(chatSocket);
          return true;
        },
        reject: (error) => {
          signal?.removeEventListener("abort", giveUp);
          chatSocket.close();
          reject(error);
        },
      };
      socket.onopen = () =>
        socket.send(JSON.stringify({
          type: "open_inference_session", model, max_length: maxLength, resumable: true, queue_updates: true,
        }));
    });
  }

  /** Reconnects and resumes the session; the request in flight goes on receiving its replies. */
  _resume() {
    return new Promise((resolve, reject) => {
      const interrupted = this.waiting;
      const socket = connect();
      const gone = new ChatError("Lost the connection to the server.", "connection_lost", true);
      this.waiting = {
        resuming: true,
        onReply: () => {
          this.waiting = interrupted;
          if (this.stopAfterResume) this.socket.send(JSON.stringify({ type: "stop" }));
          this.stopAfterResume = false;
          resolve();
          return false; // `waiting` is the interrupted request again
        },
        reject: (error) => {
          this.closed = true;
          this.resumeWith = null;
          this.waiting = interrupted;
          reject(error.code === "resume_refused" ? gone : error);
        },
      };
      this._attach(socket);
      socket.onopen = () =>
        socket.send(JSON.stringify({ type: "resume_inference_session", ...this.resumeWith, last_seq: this.lastSeq }));
    });
  }

  /** Streams one reply: `onChunk(reply)` per message of it; resolves once the reply ends. */
  async generate(request, onChunk) {
    if (!this.closed && this.dropped && this.resumeWith) await this._resume();
    return new Promise((resolve, reject) => {
      if (this.closed) {
        reject(new ChatError("Lost the connection to the server.", "connection_lost", true));
        return;
      }
      this.waiting = {
        onReply: (reply) => {
          onChunk(reply);
          if (reply.stop) resolve();
          return reply.stop;
        },
        reject,
      };
      this.socket.send(JSON.stringify({ type: "generate", ...request }));
    });
  }

  /** Asks the server to end the running generation now (once resumed, if the connection dropped). */
  stop() {
    if (this.closed) return;
    if (this.socket.readyState === WebSocket.OPEN && !(this.waiting && this.waiting.resuming)) {
      this.socket.send(JSON.stringify({ type: "stop" }));
    } else {
      this.stopAfterResume = true;
    }
  }

  /** Closes the connection and ends the session on the server; a request in flight fails. */
  close() {
    this.closed = true;
    this.socket.onclose = null;
    this.socket.close(NORMAL_CLOSURE);
    this._fail(new ChatError("The conversation was closed.", "closed", false));
  }

  _receive(reply) {
    if (reply.seq !== undefined) this.lastSeq = reply.seq;
    const waiting = this.waiting;
    if (!waiting) return;
    if (!reply.ok) {
      this._fail(new ChatError(reply.traceback, reply.code, reply.retryable, reply.retry_after));
    } else if (reply.queued) {
      // A place in line is news for the open, not its reply (that one comes once there is room).
      waiting.onQueued?.(reply.position);
    } else if (waiting.onReply(reply)) {
      this.waiting = null;
    }
  }

  _fail(error) {
    const waiting = this.waiting;
    this.waiting = null;
    if (waiting) waiting.reject(error);
  }
}
