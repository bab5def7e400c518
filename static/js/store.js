// Conversations kept in the browser's local storage, one per model, so a reload loses nothing.
// Saved as {version: 2, model, conversations: {model: conversation tree}}; the first format kept
// each conversation as a list of turns and is still read (see tree.js readConversation).

import { emptyConversation, isEmpty, readConversation } from "./tree.js";

const KEY = "swarm-chat";
const VERSION = 2;
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
    localStorage.setItem(KEY, JSON.stringify({ ...state, version: VERSION }));
  } catch {
    // Storage full or disabled (private browsing): the chat still works, it is just not kept.
  }
}

/** The model chosen last, or null. */
export function savedModel() {
  return load().model;
}

/** The conversation with `model` (an empty one if none is kept). */
export function savedConversation(model) {
  return readConversation(load().conversations[model]) ?? emptyConversation();
}

/** Keeps `conversation` as the one with `model`, and `model` as the current one. */
export function saveConversation(model, conversation) {
  const state = load();
  state.model = model;
  if (isEmpty(conversation)) delete state.conversations[model];
  else state.conversations[model] = conversation;
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
