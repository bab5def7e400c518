// The chat page: model picker, conversation, streaming replies over the WebSocket API, and
// recovery from lost connections, expired sessions and sessions that are too short.

import { ChatError, ChatSocket, fetchModels, useApiKey } from "./api.js";
import { GREETING, SYSTEM_TEXT, endsWithStop, extraStopSequences, newInputs } from "./prompt.js";
import {
  clearConversations,
  saveApiKey,
  saveConversation,
  savedApiKey,
  savedConversation,
  savedModel,
} from "./store.js";
import { setUpThemePicker } from "./theme.js";
import { conversationJson, conversationMarkdown, download, readConversationFile } from "./transfer.js";
import { activePath, addMessage, emptyConversation, removeMessage, selectVersion } from "./tree.js";
import { ConversationView } from "./view.js";

// Session sizes tried in turn when a conversation outgrows its session (capped by the model).
const SESSION_LENGTHS = [512, 2048];
const RECONNECT_DELAY_MS = 1000;

const $ = (id) => document.getElementById(id);
const ui = {
  model: $("model"),
  modelCard: $("model-card"),
  modelLicense: $("model-license"),
  newChat: $("new-chat"),
  systemPrompt: $("system-prompt"),
  systemDefault: $("system-default"),
  resetSystem: $("reset-system"),
  modelSystem: $("model-system"),
  modelSystemText: $("model-system-text"),
  useModelSystem: $("use-model-system"),
  exportJson: $("export-json"),
  exportMarkdown: $("export-markdown"),
  importFile: $("import-file"),
  clearChat: $("clear-chat"),
  temperature: $("temperature"),
  theme: $("theme"),
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
  apiKeyDialog: $("api-key-dialog"),
  apiKeyForm: $("api-key-form"),
  apiKey: $("api-key"),
  apiKeyRefused: $("api-key-refused"),
};

const state = {
  models: [], // the entries of /api/v1/models the server serves (available)
  model: null, // the chosen entry of /api/v1/models
  format: null, // the model's chat format, as the server serves it
  conversation: emptyConversation(), // the message tree (tree.js)
  // The open session, if any: its ChatSocket, the messages it holds (the last one a reply
  // without its suffix), the system text it started with, and whether it ends with the stop token.
  // `marks[i]`, for a reply held, is where the session stood right after it ({length, endsWithStop}):
  // the session can go back there; `cutTo` is the length the next generate goes back to first.
  session: null, // {socket, held, marks, system, endsWithStop, cutTo}
  sessionLength: 0, // the longest session this conversation has needed so far
  generating: false,
  stopRequested: false,
  opening: null, // the AbortController of the session being opened, which Stop gives up
  retryAction: null, // what the error box's Retry button does
};

const view = new ConversationView(ui.conversation, {
  edit: (entry, text) => ask(addMessage(entry.parent, "user", text)),
  regenerate: (entry) => answer(entry.parent),
  select: (parent, index) => {
    selectVersion(parent, index);
    persist();
    render();
  },
});

function sessionLengths(model) {
  const longest = model.chat.max_session_length;
  return [...new Set([...SESSION_LENGTHS.filter((length) => length < longest), longest])];
}

function systemText() {
  return state.conversation.system ?? SYSTEM_TEXT;
}

function dropSession() {
  if (state.session) state.session.socket.close();
  state.session = null;
}

function persist() {
  if (state.model) saveConversation(state.model.model, state.conversation);
}

function render() {
  return view.render({
    greeting: GREETING,
    path: activePath(state.conversation),
    assistantName: state.model ? state.model.frontend.name : "Assistant",
    busy: state.generating,
  });
}

function setGenerating(generating) {
  state.generating = generating;
  ui.send.hidden = generating;
  ui.stop.hidden = !generating;
  ui.stop.disabled = false;
  ui.model.disabled = generating;
  ui.conversation.setAttribute("aria-busy", String(generating));
  document.body.classList.toggle("generating", generating);
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

/** "1st", "2nd", "3rd", "4th"... "11th", "21st". */
function ordinal(number) {
  const suffixes = { 1: "st", 2: "nd", 3: "rd" };
  const teen = number % 100 >= 11 && number % 100 <= 13;
  return `${number}${(!teen && suffixes[number % 10]) || "th"}`;
}

function queueStatus(position) {
  return `Server full — waiting for a place in line: ${ordinal(position)}`;
}

/** `seconds` as "about 3 h 5 min" (to the minute above, so that the time is up when it says). */
function aboutDuration(seconds) {
  const minutes = Math.max(1, Math.ceil(seconds / 60));
  const hours = Math.floor(minutes / 60);
  return hours ? `about ${hours} h ${minutes % 60} min` : `about ${minutes} min`;
}

// Errors that the same request cannot get past by trying again soon: no Retry.
const NOT_RETRIED = new Set(["max_length_exceeded", "quota_exceeded", "model_not_allowed"]);

function errorMessage(error) {
  switch (error.code) {
    case "cache_full":
      return "The swarm is out of capacity: its attention cache is full. Please try again in a minute.";
    case "memory_budget_exceeded":
      return "The server holds as many conversations as it can. Please try again in a minute.";
    case "server_busy":
      return "The server stayed full: no place opened up for this chat in time. Please try again in a minute.";
    case "quota_exceeded":
      return "Your daily token budget is used up; it renews at 00:00 UTC " +
        `(in ${aboutDuration(error.retryAfter)}).`;
    case "rate_limited":
      return `Too many requests for this key; try again in ${error.retryAfter} s.`;
    case "model_not_allowed":
      return `This API key may not use ${state.model.frontend.name}. Choose another model.`;
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
    trace_route: true, // the last reply names the swarm servers that computed it
    do_sample: temperature > 0 ? 1 : 0,
  };
  if (temperature > 0) {
    request.temperature = temperature;
    if (chat.generation_params.top_p !== undefined) request.top_p = chat.generation_params.top_p;
  }
  return request;
}

/** How many messages `held` and `turns` begin with in common. */
function sharedTurns(held, turns) {
  let shared = 0;
  while (shared < held.length && held[shared] === turns[shared]) shared += 1;
  return shared;
}

/**
 * The open session if it can go on to `turns` in `length` tokens, else a new one, for which
 * `onQueued(position)` hears of its place in line while the server is full. A session whose
 * history parts from `turns` (an edit, a regeneration, another version chosen) goes back to
 * the last reply they share, if any: the server keeps everything before it.
 */
async function openSession(length, turns, onQueued) {
  const session = state.session;
  if (session && !session.socket.closed && session.socket.maxLength >= length && session.system === systemText()) {
    const shared = sharedTurns(session.held, turns);
    if (shared === session.held.length) return session;
    const back = session.marks.slice(0, shared).findLastIndex((mark) => mark);
    if (back >= 0) {
      const mark = session.marks[back];
      Object.assign(session, {
        held: session.held.slice(0, back + 1), marks: session.marks.slice(0, back + 1),
        endsWithStop: mark.endsWithStop, cutTo: mark.length,
      });
      return session;
    }
  }
  dropSession();
  state.opening = new AbortController();
  const socket = await ChatSocket.open(state.model.model, length, { onQueued, signal: state.opening.signal })
    .finally(() => { state.opening = null; });
  state.session = { socket, held: [], marks: [], system: systemText(), endsWithStop: false, cutTo: null };
  return state.session;
}

function replyStats(startedAt, firstTokenAt, tokens) {
  const streamingSeconds = (performance.now() - firstTokenAt) / 1000;
  return {
    firstTokenSeconds: (firstTokenAt - startedAt) / 1000,
    tokens,
    tokensPerSecond: tokens > 1 && streamingSeconds > 0 ? (tokens - 1) / streamingSeconds : null,
  };
}

/**
 * Streams the reply to `turns` (the messages before it) into `reply`, shown through `show`. The
 * reply holds the replies' `text` (stop sequences already cut by the server); their raw `outputs`
 * tell what the session holds.
 */
async function streamReply(length, turns, reply, show) {
  const startedAt = performance.now();
  reply.text = "";
  delete reply.stats;
  delete reply.route;
  show(reply.text, null);
  const session = await openSession(length, turns, (position) => show(reply.text, null, queueStatus(position)));
  show(reply.text, null); // no longer waiting in line, if it was
  if (state.stopRequested) return; // stopped while the session was opening
  const inputs = newInputs(state.format, session.system, turns, session.held.length, session.endsWithStop);
  let raw = "";
  let shown = "";
  let tokens = 0;
  let firstTokenAt = null;
  let heldLength = null; // the session's length once the reply is in, as the server says
  const request = generationRequest(inputs);
  if (session.cutTo) request.from_position = session.cutTo;
  session.cutTo = null;
  const heldMarks = session.marks;
  await session.socket.generate(request, (message) => {
    raw += message.outputs;
    shown += message.text;
    tokens += message.token_count;
    firstTokenAt ??= performance.now();
    reply.text = shown.trimStart();
    reply.stats = replyStats(startedAt, firstTokenAt, tokens);
    if (message.route) reply.route = message.route;
    if (message.session_length) heldLength = message.session_length;
    show(reply.text, reply.stats);
  });
  session.held = [...turns, reply];
  session.endsWithStop = endsWithStop(state.format, raw);
  const newTurns = turns.slice(heldMarks.length).map(() => null);
  session.marks = [...heldMarks, ...newTurns, heldLength && { length: heldLength, endsWithStop: session.endsWithStop }];
}

/**
 * Writes a new version of the reply to `question`, a user message of the active path. A session
 * that is too short is reopened longer and the conversation replayed; a lost connection or an
 * expired session is retried once by itself.
 */
async function answer(question) {
  hideError();
  state.stopRequested = false;
  const path = activePath(state.conversation).map((entry) => entry.message);
  const turns = path.slice(0, path.indexOf(question) + 1);
  const reply = addMessage(question, "assistant", "");
  setGenerating(true);
  const show = render();
  const lengths = sessionLengths(state.model);
  let lengthIndex = Math.max(0, lengths.findIndex((length) => length >= state.sessionLength));
  let retriedOnce = false;
  let keep = true;
  try {
    for (;;) {
      try {
        await streamReply(lengths[lengthIndex], turns, reply, show);
        return;
      } catch (error) {
        if (!(error instanceof ChatError)) throw error;
        dropSession();
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
        keep = tooLong;
        const retry = NOT_RETRIED.has(error.code) ? null : () => answer(question);
        showError(errorMessage(error), { retry, newChat: tooLong });
        return;
      }
    }
  } finally {
    // A reply that failed or has no text (stopped before its first token) is not kept.
    if (!keep || !reply.text) removeMessage(question, reply);
    persist();
    setGenerating(false);
    render();
  }
}

/** Adds `question` (already in the tree) to the saved conversation and answers it. */
function ask(question) {
  persist();
  answer(question);
}

function send() {
  const text = ui.prompt.value.trim();
  if (!text || state.generating || !state.model) return;
  ui.prompt.value = "";
  resizePrompt();
  const last = activePath(state.conversation).at(-1);
  let parent = last ? last.message : state.conversation;
  // A question left without a reply (its reply failed) gets this one as its new version.
  if (last?.message.role === "user") parent = last.parent;
  ask(addMessage(parent, "user", text));
}

function stop() {
  if (!state.generating) return;
  state.stopRequested = true;
  ui.stop.disabled = true;
  // A session still waiting for room gives up its place in line.
  state.opening?.abort();
  if (state.session) state.session.socket.stop();
}

// --- Conversations ---------------------------------------------------------------------------

function showSystemPrompt() {
  ui.systemPrompt.value = systemText();
  const modelDefault = state.format?.default_system;
  ui.modelSystem.hidden = !modelDefault;
  ui.modelSystemText.textContent = modelDefault ?? "";
}

function setSystemText(text) {
  // The default is kept as null, so that a conversation follows it if it changes.
  state.conversation.system = text === SYSTEM_TEXT ? null : text;
  persist();
}

/** Shows `conversation` as the current one (the session of the one before is dropped). */
function showConversation(conversation) {
  if (state.generating) stop();
  dropSession();
  state.sessionLength = 0;
  hideError();
  state.conversation = conversation;
  persist();
  showSystemPrompt();
  render();
}

function newChat() {
  // A new chat keeps the system text; Clear forgets it too.
  showConversation(emptyConversation(state.conversation.system));
  ui.prompt.focus();
}

function clearChat() {
  showConversation(emptyConversation());
  ui.prompt.focus();
}

function exportName(extension) {
  const name = state.model.frontend.name.toLowerCase().replace(/[^a-z0-9]+/g, "-");
  return `chat-${name}-${new Date().toISOString().slice(0, 10)}.${extension}`;
}

function exportJson() {
  download(exportName("json"), conversationJson(state.model.model, state.conversation), "application/json");
}

function exportMarkdown() {
  const name = state.model.frontend.name;
  const messages = [{ author: name, text: GREETING }, ...activePath(state.conversation).map(({ message }) =>
    ({ author: message.role === "user" ? "You" : name, text: message.text }))];
  download(exportName("md"), conversationMarkdown(`Chat with ${name}`, systemText(), messages), "text/markdown");
}

/** Makes the conversation in `file` the one with the model it was exported from (or the current one). */
async function importConversation(file) {
  let imported;
  try {
    imported = readConversationFile(await file.text());
  } catch (error) {
    showError(`Cannot import ${file.name}: ${error.message}`);
    return;
  }
  const model = state.models.find((entry) => entry.model === imported.model) ?? state.model;
  saveConversation(model.model, imported.conversation);
  selectModel(model.model);
}

// --- Models ----------------------------------------------------------------------------------

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
  state.model = model;
  state.format = model.chat.format;
  ui.model.value = model.model;
  const params = model.chat.generation_params;
  ui.temperature.value = params.do_sample ? String(params.temperature ?? 1) : "0";
  showModelInfo(model);
  const conversation = savedConversation(model.model);
  // A question that never got its answer goes back into the message box.
  const last = activePath(conversation).at(-1);
  if (last?.message.role === "user") {
    ui.prompt.value = last.message.text;
    removeMessage(last.parent, last.message);
  }
  showConversation(conversation);
}

/** The picker's entry for `model`: greyed out, with the server's reason as its tooltip, when the
 * server declares it but cannot serve it. */
function modelOption(model) {
  if (model.available) return new Option(model.frontend.name, model.model);
  const option = new Option(`${model.frontend.name} (unavailable)`, model.model);
  option.disabled = true;
  option.title = model.error;
  return option;
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
    for (const model of members) group.append(modelOption(model));
    return group;
  });
  ui.model.replaceChildren(...groups);
  ui.model.disabled = false;
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
  let declared;
  try {
    declared = await fetchModels();
  } catch (error) {
    if (error.code === "unauthorized") askForApiKey();
    else showError(error.message, { retry: loadModels });
    return;
  }
  state.models = declared.filter((model) => model.available);
  if (!state.models.length) {
    showError("The server serves no model yet.", { retry: loadModels });
    return;
  }
  fillModelPicker(declared);
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
ui.systemPrompt.addEventListener("input", () => setSystemText(ui.systemPrompt.value));
ui.resetSystem.addEventListener("click", () => {
  setSystemText(SYSTEM_TEXT);
  showSystemPrompt();
});
ui.useModelSystem.addEventListener("click", () => {
  setSystemText(state.format.default_system);
  showSystemPrompt();
});
ui.exportJson.addEventListener("click", exportJson);
ui.exportMarkdown.addEventListener("click", exportMarkdown);
ui.importFile.addEventListener("change", () => {
  const [file] = ui.importFile.files;
  ui.importFile.value = ""; // the same file can be imported again
  if (file) importConversation(file);
});
ui.clearChat.addEventListener("click", clearChat);
ui.apiKeyForm.addEventListener("submit", () => {
  // The form's method is "dialog": submitting closes the dialog.
  saveApiKey(ui.apiKey.value);
  useApiKey(ui.apiKey.value);
  loadModels();
});
ui.clearSaved.addEventListener("click", () => {
  clearConversations();
  clearChat();
});

// Leaving the page ends the session at once; a dropped connection leaves it resumable instead.
window.addEventListener("pagehide", dropSession);

ui.systemDefault.textContent = SYSTEM_TEXT;
setUpThemePicker(ui.theme);
useApiKey(savedApiKey());
render();
loadModels();
