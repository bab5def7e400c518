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

/** An error reply, or a failure of the connection itself (code "connection_lost"). */
export class ChatError extends Error {
  constructor(message, code, retryable) {
    super(message);
    this.code = code;
    this.retryable = retryable;
  }
}

/** The served models, in the server's order. */
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

/** One WebSocket connection holding one inference session. */
export class ChatSocket {
  constructor(socket, maxLength) {
    this.socket = socket;
    this.maxLength = maxLength;
    // The request in flight: onReply(reply) handles a reply and says whether it was the last.
    this.waiting = null;
    this.closed = false;
    socket.onmessage = (event) => this._receive(JSON.parse(event.data));
    socket.onclose = () => {
      this.closed = true;
      this._fail(new ChatError("Lost the connection to the server.", "connection_lost", true));
    };
  }

  /** Connects and opens a session on `model` that may hold `maxLength` tokens. */
  static open(model, maxLength) {
    return new Promise((resolve, reject) => {
      const protocols = apiKey ? [SUBPROTOCOL, KEY_SUBPROTOCOL_PREFIX + base64url(apiKey)] : [];
      const socket = new WebSocket(socketUrl(), protocols);
      const chatSocket = new ChatSocket(socket, maxLength);
      chatSocket.waiting = {
        onReply: () => {
          resolve(chatSocket);
          return true;
        },
        reject: (error) => {
          chatSocket.close();
          reject(error);
        },
      };
      socket.onopen = () =>
        socket.send(JSON.stringify({ type: "open_inference_session", model, max_length: maxLength }));
    });
  }

  /** Streams one reply: `onChunk(reply)` per message of it; resolves once the reply ends. */
  generate(request, onChunk) {
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

  /** Asks the server to end the running generation now. */
  stop() {
    if (!this.closed) this.socket.send(JSON.stringify({ type: "stop" }));
  }

  /** Closes the connection (the server then frees the session); a request in flight fails. */
  close() {
    this.closed = true;
    this.socket.onclose = null;
    this.socket.close();
    this._fail(new ChatError("The conversation was closed.", "closed", false));
  }

  _receive(reply) {
    const waiting = this.waiting;
    if (!waiting) return;
    if (!reply.ok) {
      this._fail(new ChatError(reply.traceback, reply.code, reply.retryable));
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
