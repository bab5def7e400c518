// Conversations kept in the browser's local storage, one per model, so a reload loses nothing.

const KEY = "swarm-chat";
const API_KEY = "swarm-chat-api-key";

function load() {
  try {
    const saved = JSON.parse(localStorage.getItem(KEY));
    if (saved && typeof saved === "object" && saved.conversations) return saved;
  } catch {
    // Unreadable or unavailable storage: start afresh.
  }
  return { model: null, conversations: {} };
}

function save(state) {
  try {
    localStorage.setItem(KEY, JSON.stringify(state));
  } catch {
    // Storage full or disabled (private browsing): the chat still works, it is just not kept.
  }
}

/** The model chosen last, or null. */
export function savedModel() {
  return load().model;
}

/** The turns ([{role, text}]) of the conversation with `model`. */
export function savedTurns(model) {
  const turns = load().conversations[model];
  return Array.isArray(turns) ? turns.filter((turn) => turn && typeof turn.text === "string") : [];
}

/** Keeps `turns` as the conversation with `model`, and `model` as the current one. */
export function saveConversation(model, turns) {
  const state = load();
  state.model = model;
  if (turns.length) state.conversations[model] = turns;
  else delete state.conversations[model];
  save(state);
}

/** Forgets every conversation. */
export function clearConversations() {
  try {
    localStorage.removeItem(KEY);
  } catch {
    // Nothing was kept.
  }
}

/** The API key given for this server, or null. */
export function savedApiKey() {
  try {
    return localStorage.getItem(API_KEY);
  } catch {
    return null;
  }
}

/** Keeps the API key, so that it is asked for once. */
export function saveApiKey(key) {
  try {
    localStorage.setItem(API_KEY, key);
  } catch {
    // Not kept: it is asked for again on the next visit.
  }
}
