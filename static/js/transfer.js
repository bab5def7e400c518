// Conversations in and out of the page as files: JSON (the whole tree, every version of every
// message, which the page imports again) and Markdown (the messages shown, for people to read).

import { readConversation } from "./tree.js";

const FORMAT = "swarm-chat conversation";
const VERSION = 2;

/** The conversation with `model` (its key in /api/v1/models) as an exported JSON file's text. */
export function conversationJson(model, conversation) {
  return JSON.stringify({ format: FORMAT, version: VERSION, model, conversation }, null, 1);
}

/**
 * The messages shown as a Markdown document: `title`, the system text, then each message under
 * its author's name (`messages`: [{author, text}], the greeting included).
 */
export function conversationMarkdown(title, systemText, messages) {
  const sections = [`# ${title}`, `**System prompt:** ${systemText}`];
  for (const { author, text } of messages) sections.push(`## ${author}`, text);
  return sections.join("\n\n") + "\n";
}

/** The model and conversation of an exported JSON file's `text`; throws an Error saying what is wrong. */
export function readConversationFile(text) {
  let file;
  try {
    file = JSON.parse(text);
  } catch {
    throw new Error("This file is not JSON.");
  }
  const conversation = file?.format === FORMAT ? readConversation(file.conversation) : null;
  if (!conversation) throw new Error("This file is not a conversation exported from this page.");
  return { model: typeof file.model === "string" ? file.model : null, conversation };
}

/** Offers `text` for download as a file named `name`, of MIME type `type`. */
export function download(name, text, type) {
  const url = URL.createObjectURL(new Blob([text], { type }));
  const link = document.createElement("a");
  link.href = url;
  link.download = name;
  link.click();
  // The download has started from the link's click: the URL can go once that task is done.
  setTimeout(() => URL.revokeObjectURL(url));
}
