// The chat page: model picker, conversation, streaming replies over the WebSocket API, and
// recovery from lost connections, expired sessions and sessions that are too short.

import { ChatError, ChatSocket, fetchModels, useApiKey } from "./api.js";
import { GREETING, endsWithStop, extraStopSequences, newInputs } from "./prompt.js";
import { renderText } from "./render.js";
import {
  clearConversations,
  saveApiKey,
  saveConversation,
  savedApiKey,
  savedModel,
  savedTurns,
} from "./store.js";

// Session sizes tried in turn when a conversation outgrows its session (capped by the model).
const SESSION_LENGTHS = [512, 2048];
const RECONNECT_DELAY_MS = 1000;

const $ = (id) => document.getElementById(id);
const ui = {
  model: $("model"),
  modelCard: $("model-card"),
  modelLicense: $("model-license"),
  newChat: $("new-chat"),
  temperature: $("temperature"),
  clearSaved: $("clear-saved"),
  conversation: $("conversation"),
  error: $("error"),
  errorText: $("error-text"),
  retry: $("retry"),
  errorNewChat: $("error-new-chat"),
  composer: $("composer"),
  prompt: $("prompt"),
  send: $("send"),
  stop: $("stop"),
  speed: $("speed"),
  apiKeyDialog: $("api-key-dialog"),
  apiKeyForm: $("api-key-form"),
  apiKey: $("api-key"),
  apiKeyRefused: $("api-key-refused"),
};

const state = {
  models: [],
  model: null, // the chosen entry of /api/v1/models
  format: null, // the model's chat format, as the server serves it
  turns: [], // [{role: "user" | "assistant", text}]
  socket: null, // the open ChatSocket, if any
  sessionLength: 0, // the longest session this conversation has needed so far
  sentTurns: 0, // turns already held by the socket's session
  endsWithStop: false, // whether the session's last reply ended with the stop token
  generating: false,
  stopRequested: false,
  retryAction: null, // what the error box's Retry button does
};

function sessionLengths(model) {
  const longest = model.chat.max_session_length;
  return [...new Set([...SESSION_LENGTHS.filter((length) => length < longest), longest])];
}

function dropSession() {
  if (state.socket) state.socket.close();
  state.socket = null;
  state.sentTurns = 0;
  state.endsWithStop = false;
}

function persist() {
  saveConversation(state.model.model, state.turns);
}

// --- Rendering -------------------------------------------------------------------------------

function messageElement(role, text) {
  const article = document.createElement("article");
  article.className = `message ${role}`;
  const who = document.createElement("h2");
  who.className = "who";
  who.textContent = role === "user" ? "You" : state.model ? state.model.frontend.name : "Assistant";
  const body = document.createElement("div");
  body.className = "body";
  renderText(body, text);
  article.append(who, body);
  return article;
}

function regenerateButton() {
  const button = document.createElement("button");
  button.type = "button";
  button.className = "regenerate";
  button.textContent = "Regenerate";
  button.setAttribute("aria-label", "Regenerate the last reply");
  button.addEventListener("click", regenerate);
  return button;
}

function renderConversation() {
  const elements = [messageElement("assistant", GREETING)];
  state.turns.forEach((turn, index) => {
    const element = messageElement(turn.role, turn.text);
    const isLastReply = index === state.turns.length - 1 && turn.role === "assistant";
    if (isLastReply && !state.generating) element.append(regenerateButton());
    elements.push(element);
  });
  ui.conversation.replaceChildren(...elements);
  ui.conversation.scrollTop = ui.conversation.scrollHeight;
}

function setGenerating(generating) {
  state.generating = generating;
  ui.send.hidden = generating;
  ui.stop.hidden = !generating;
  ui.stop.disabled = false;
  ui.model.disabled = generating;
  ui.conversation.setAttribute("aria-busy", String(generating));
  document.body.classList.toggle("generating", generating);
  if (!generating) renderConversation();
}

function showError(message, { retry = null, newChat = false } = {}) {
  state.retryAction = retry;
  ui.errorText.textContent = message;
  ui.retry.hidden = !retry;
  ui.errorNewChat.hidden = !newChat;
  ui.error.hidden = false;
}

function hideError() {
  ui.error.hidden = true;
  state.retryAction = null;
}

function errorMessage(error) {
  switch (error.code) {
    case "cache_full":
      return "The swarm is out of capacity: its attention cache is full. Please try again in a minute.";
    case "memory_budget_exceeded":
    case "server_busy":
      return "The server holds as many conversations as it can. Please try again in a minute.";
    case "connection_lost":
      return "Lost the connection to the server. Check that it is running, then retry.";
    case "session_expired":
      return "The session expired. Retry to start a new one with this conversation.";
    case "max_length_exceeded":
      return `This conversation no longer fits in ${state.model.frontend.name}'s longest session ` +
        `(${state.model.chat.max_session_length} tokens). Start a new chat to go on.`;
    default:
      return `The server could not answer: ${error.message}`;
  }
}

// --- Generation ------------------------------------------------------------------------------

function generationRequest(inputs) {
  const { chat } = state.model;
  const temperature = Number(ui.temperature.value);
  const request = {
    inputs,
    max_new_tokens: 1,
    stop_sequence: state.format.stop_token,
    extra_stop_sequences: extraStopSequences(state.format),
    visible_text: true, // the server holds back what may start a stop sequence
    do_sample: temperature > 0 ? 1 : 0,
  };
  if (temperature > 0) {
    request.temperature = temperature;
    if (chat.generation_params.top_p !== undefined) request.top_p = chat.generation_params.top_p;
  }
  return request;
}

async function openSession(length) {
  if (state.socket && !state.socket.closed && state.socket.maxLength >= length) return state.socket;
  dropSession();
  state.socket = await ChatSocket.open(state.model.model, length);
  return state.socket;
}

function showSpeed(tokens, firstTokenAt) {
  const seconds = (performance.now() - firstTokenAt) / 1000;
  const speed = tokens > 1 && seconds > 0 ? `, ${((tokens - 1) / seconds).toFixed(1)} tokens/s` : "";
  ui.speed.textContent = `${tokens} token${tokens === 1 ? "" : "s"}${speed}`;
}

/**
 * Streams the reply to the conversation's last user turn into a new assistant turn. The turn
 * shows the replies' `text` (stop sequences already cut by the server); their raw `outputs`
 * tell what the session holds.
 */
async function streamReply(length) {
  const socket = await openSession(length);
  if (state.stopRequested) return; // stopped while the session was opening
  const inputs = newInputs(state.format, state.turns, state.sentTurns, state.endsWithStop);
  const reply = { role: "assistant", text: "" };
  state.turns.push(reply);
  renderConversation();
  const body = ui.conversation.lastElementChild.querySelector(".body");
  let raw = "";
  let shown = "";
  let tokens = 0;
  let firstTokenAt = null;
  await socket.generate(generationRequest(inputs), (message) => {
    raw += message.outputs;
    shown += message.text;
    tokens += message.token_count;
    firstTokenAt ??= performance.now();
    reply.text = shown.trimStart();
    renderText(body, reply.text);
    showSpeed(tokens, firstTokenAt);
    ui.conversation.scrollTop = ui.conversation.scrollHeight;
  });
  state.sentTurns = state.turns.length;
  state.endsWithStop = endsWithStop(state.format, raw);
}

/**
 * Answers the last user turn. A session that is too short is reopened longer and the
 * conversation replayed; a lost connection or an expired session is retried once by itself.
 */
async function answer() {
  hideError();
  setGenerating(true);
  state.stopRequested = false;
  const lengths = sessionLengths(state.model);
  let lengthIndex = Math.max(0, lengths.findIndex((length) => length >= state.sessionLength));
  let retriedOnce = false;
  try {
    for (;;) {
      try {
        await streamReply(lengths[lengthIndex]);
        return;
      } catch (error) {
        if (!(error instanceof ChatError)) throw error;
        dropSession();
        // The unfinished reply goes; a retry writes a new one.
        const unfinished = state.turns.at(-1)?.role === "assistant" ? state.turns.pop() : null;
        if (state.stopRequested) return;
        if (error.code === "max_length_exceeded" && lengthIndex < lengths.length - 1) {
          lengthIndex += 1;
          state.sessionLength = lengths[lengthIndex];
          continue;
        }
        if ((error.code === "connection_lost" || error.code === "session_expired") && !retriedOnce) {
          retriedOnce = true;
          await new Promise((resolve) => setTimeout(resolve, RECONNECT_DELAY_MS));
          continue;
        }
        const tooLong = error.code === "max_length_exceeded";
        // At the model's longest session the reply cannot get further: keep what it wrote.
        if (tooLong && unfinished?.text) state.turns.push(unfinished);
        showError(errorMessage(error), { retry: tooLong ? null : answer, newChat: tooLong });
        return;
      }
    }
  } finally {
    persist();
    setGenerating(false);
  }
}

function send() {
  const text = ui.prompt.value.trim();
  if (!text || state.generating || !state.model) return;
  ui.prompt.value = "";
  resizePrompt();
  state.turns.push({ role: "user", text });
  persist();
  answer();
}

function stop() {
  if (!state.generating) return;
  state.stopRequested = true;
  ui.stop.disabled = true;
  if (state.socket) state.socket.stop();
}

function regenerate() {
  if (state.generating || state.turns.at(-1)?.role !== "assistant") return;
  state.turns.pop();
  dropSession(); // the session holds the old reply: replay the conversation without it
  answer();
}

// --- Models and conversations ----------------------------------------------------------------

function showModelInfo(model) {
  const { name, model_card: card, license } = model.frontend;
  for (const [link, href, what] of [[ui.modelCard, card, "model card"], [ui.modelLicense, license, "license"]]) {
    link.hidden = !href;
    if (href) {
      link.href = href;
      link.target = "_blank";
      link.rel = "noopener noreferrer";
      link.setAttribute("aria-label", `${name} ${what}`);
    }
  }
}

function selectModel(key) {
  const model = state.models.find((entry) => entry.model === key) || state.models[0];
  dropSession();
  state.sessionLength = 0;
  hideError();
  state.model = model;
  state.format = model.chat.format;
  ui.model.value = model.model;
  const params = model.chat.generation_params;
  ui.temperature.value = params.do_sample ? String(params.temperature ?? 1) : "0";
  showModelInfo(model);
  state.turns = savedTurns(model.model);
  // A question that never got its answer goes back into the message box.
  if (state.turns.at(-1)?.role === "user") ui.prompt.value = state.turns.pop().text;
  persist();
  ui.speed.textContent = "";
  renderConversation();
}

function fillModelPicker(models) {
  const families = new Map();
  for (const model of models) {
    if (!families.has(model.family)) families.set(model.family, []);
    families.get(model.family).push(model);
  }
  const groups = [...families].map(([family, members]) => {
    const group = document.createElement("optgroup");
    group.label = family;
    for (const model of members) group.append(new Option(model.frontend.name, model.model));
    return group;
  });
  ui.model.replaceChildren(...groups);
  ui.model.disabled = false;
}

function newChat() {
  if (state.generating) stop();
  dropSession();
  state.sessionLength = 0;
  hideError();
  state.turns = [];
  persist();
  ui.speed.textContent = "";
  renderConversation();
  ui.prompt.focus();
}

function askForApiKey() {
  // A key given before and refused now is wrong (or was changed on the server).
  ui.apiKeyRefused.hidden = savedApiKey() === null;
  ui.apiKey.value = "";
  if (!ui.apiKeyDialog.open) ui.apiKeyDialog.showModal();
  ui.apiKey.focus();
}

async function loadModels() {
  hideError();
  try {
    state.models = await fetchModels();
  } catch (error) {
    if (error.code === "unauthorized") askForApiKey();
    else showError(error.message, { retry: loadModels });
    return;
  }
  if (!state.models.length) {
    showError("The server serves no model yet.", { retry: loadModels });
    return;
  }
  fillModelPicker(state.models);
  selectModel(savedModel());
}

// --- Wiring ----------------------------------------------------------------------------------

function resizePrompt() {
  ui.prompt.style.height = "auto";
  ui.prompt.style.height = `${Math.min(ui.prompt.scrollHeight, 200)}px`;
}

ui.composer.addEventListener("submit", (event) => {
  event.preventDefault();
  send();
});
ui.prompt.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    send();
  }
});
ui.prompt.addEventListener("input", resizePrompt);
document.addEventListener("keydown", (event) => {
  if (event.key === "Escape" && state.generating) stop();
});
ui.stop.addEventListener("click", stop);
ui.newChat.addEventListener("click", newChat);
ui.errorNewChat.addEventListener("click", newChat);
ui.retry.addEventListener("click", () => state.retryAction?.());
ui.model.addEventListener("change", () => selectModel(ui.model.value));
ui.apiKeyForm.addEventListener("submit", () => {
  // The form's method is "dialog": submitting closes the dialog.
  saveApiKey(ui.apiKey.value);
  useApiKey(ui.apiKey.value);
  loadModels();
});
ui.clearSaved.addEventListener("click", () => {
  clearConversations();
  newChat();
});

useApiKey(savedApiKey());
renderConversation();
loadModels();
