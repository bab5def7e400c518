// A conversation is a tree of messages. A message may have several versions (a question edited,
// a reply regenerated): they are the children of the same parent, and the parent's `active`
// child is the one shown. The messages shown are the path from the root through active children.
//
//   conversation: {system, children, active}   system: its system text, or null for the default
//   message:      {role, text, children, active, stats?}   role: "user" or "assistant", alternating
//   stats:        {firstTokenSeconds, tokens, tokensPerSecond} of a reply, as it was generated

/** A conversation with no message yet; `system` null stands for the page's default text. */
export function emptyConversation(system = null) {
  return { system, children: [], active: 0 };
}

/** The messages shown, first to last, each with its parent: [{message, parent}]. */
export function activePath(conversation) {
  const path = [];
  let parent = conversation;
  while (parent.children.length) {
    const message = parent.children[parent.active];
    path.push({ message, parent });
    parent = message;
  }
  return path;
}

/** Adds a message as the newest version under `parent` (the conversation or a message) and shows it. */
export function addMessage(parent, role, text) {
  const message = { role, text, children: [], active: 0 };
  parent.children.push(message);
  parent.active = parent.children.length - 1;
  return message;
}

/** Removes `message` from `parent`'s versions; the newest remaining one is shown. */
export function removeMessage(parent, message) {
  parent.children.splice(parent.children.indexOf(message), 1);
  parent.active = Math.max(0, parent.children.length - 1);
}

/** Shows version `index` (from 0) of `parent`'s children. */
export function selectVersion(parent, index) {
  parent.active = Math.max(0, Math.min(index, parent.children.length - 1));
}

function validStats(stats) {
  if (!stats || typeof stats !== "object") return undefined;
  const { firstTokenSeconds, tokens, tokensPerSecond } = stats;
  const optional = [firstTokenSeconds, tokensPerSecond];
  if (!Number.isInteger(tokens) || !optional.every((value) => value === null || Number.isFinite(value))) {
    return undefined;
  }
  return { firstTokenSeconds, tokens, tokensPerSecond };
}

// The valid messages of `children` (written by anyone: storage or an imported file), whose role is `role`.
function validMessages(children, role) {
  if (!Array.isArray(children)) return [];
  const next = role === "user" ? "assistant" : "user";
  return children
    .filter((child) => child && child.role === role && typeof child.text === "string")
    .map((child) => {
      const message = { role, text: child.text, children: validMessages(child.children, next), active: 0 };
      selectVersion(message, Number.isInteger(child.active) ? child.active : 0);
      const stats = validStats(child.stats);
      if (role === "assistant" && stats) message.stats = stats;
      return message;
    });
}

/**
 * The conversation in `value` as saved (or exported) by the page, or null if there is none.
 * The first saved format, a list of turns ([{role, text}]), becomes a tree with one version of
 * each message. Messages that are malformed or out of turn are left out, with what follows them.
 */
export function readConversation(value) {
  if (Array.isArray(value)) {
    const conversation = emptyConversation();
    let parent = conversation;
    for (const turn of value) {
      const expected = parent === conversation || parent.role === "assistant" ? "user" : "assistant";
      if (!turn || turn.role !== expected || typeof turn.text !== "string") break;
      parent = addMessage(parent, turn.role, turn.text);
    }
    return conversation;
  }
  if (!value || typeof value !== "object" || !Array.isArray(value.children)) return null;
  const conversation = emptyConversation(typeof value.system === "string" ? value.system : null);
  conversation.children = validMessages(value.children, "user");
  selectVersion(conversation, Number.isInteger(value.active) ? value.active : 0);
  return conversation;
}

/** Whether the conversation holds nothing worth keeping: no message and the default system text. */
export function isEmpty(conversation) {
  return conversation.children.length === 0 && conversation.system === null;
}
