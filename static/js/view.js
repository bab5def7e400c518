// The conversation on the page: the greeting, then the messages shown (the active path of the
// conversation tree). A question is shown as typed, with Edit; a reply as Markdown, with its
// speed, the route through the swarm that wrote it, Regenerate, and ‹ 1/2 › between the versions
// of a message.

import { MarkdownView, enableCodeCopy } from "./markdown.js";
import { routeRibbon } from "./route.js";

// How close to the end (in pixels) the log must be scrolled for a growing reply to keep it there.
const STICK_TO_END_PX = 40;

/** A reply's speed as shown under it: time to the first token, tokens and tokens/s. */
export function formatStats({ firstTokenSeconds, tokens, tokensPerSecond }) {
  const parts = [];
  if (firstTokenSeconds !== null) parts.push(`first token after ${firstTokenSeconds.toFixed(2)} s`);
  parts.push(`${tokens} token${tokens === 1 ? "" : "s"}`);
  if (tokensPerSecond !== null) parts.push(`${tokensPerSecond.toFixed(1)} tokens/s`);
  return parts.join(" · ");
}

function button(className, text, label, onClick) {
  const element = document.createElement("button");
  element.type = "button";
  element.className = className;
  element.textContent = text;
  element.setAttribute("aria-label", label);
  element.addEventListener("click", onClick);
  return element;
}

/** The conversation log, drawn from the active path; `actions` are what its buttons do. */
export class ConversationView {
  /**
   * `actions`: edit(entry, text) sends an edited question, regenerate(entry) writes another
   * version of a reply, select(parent, index) shows another version; `entry` is {message, parent}.
   */
  constructor(log, actions) {
    this.log = log;
    this.actions = actions;
    enableCodeCopy(log);
  }

  /**
   * Shows the greeting and the messages of `path` ([{message, parent}]), replies under
   * `assistantName`. While `busy` (a reply is being written) no message offers actions.
   * Returns the last message's `update(text, stats, status)` when it is a reply, which shows the
   * text and speed of that reply as it is written, and `status`, a line on what the reply waits
   * for, if any (and nothing once the log is drawn again).
   */
  render({ greeting, path, assistantName, busy }) {
    const articles = [this._article("assistant", assistantName, greeting).article];
    let updateLastReply = null;
    for (const entry of path) {
      const { role, text, stats, route } = entry.message;
      const parts = this._article(role, role === "user" ? "You" : assistantName, text);
      const footer = document.createElement("footer");
      footer.className = role === "user" ? "message-actions" : "reply-meta";
      updateLastReply = null;
      if (role === "assistant") {
        // Where the speed goes: a footer that other facts about the reply can join.
        const status = document.createElement("span");
        status.className = "reply-status";
        status.hidden = true;
        const speed = document.createElement("span");
        speed.className = "reply-speed";
        if (stats) speed.textContent = formatStats(stats);
        footer.append(status, speed);
        if (route) footer.append(routeRibbon(route));
        updateLastReply = (replyText, replyStats, replyStatus = "") =>
          this._update(parts.markdown, { status, speed }, replyText, replyStats, replyStatus);
      }
      if (!busy) footer.append(...this._actions(entry, parts));
      parts.article.append(footer);
      articles.push(parts.article);
    }
    this.log.replaceChildren(...articles);
    this.log.scrollTop = this.log.scrollHeight;
    return updateLastReply;
  }

  _update(markdown, { status, speed }, text, stats, statusText) {
    if (!markdown.element.isConnected) return; // the log was drawn again since
    const atEnd = this.log.scrollHeight - this.log.scrollTop - this.log.clientHeight < STICK_TO_END_PX;
    markdown.update(text, true);
    // Hidden when empty, so that the footer's gap is not left around nothing.
    status.textContent = statusText;
    status.hidden = !statusText;
    speed.textContent = stats ? formatStats(stats) : "";
    // Follow the reply unless the reader has scrolled up to read something else.
    if (atEnd) this.log.scrollTop = this.log.scrollHeight;
  }

  _article(role, author, text) {
    const article = document.createElement("article");
    article.className = `message ${role}`;
    const who = document.createElement("h2");
    who.className = "who";
    who.textContent = author;
    const body = document.createElement("div");
    body.className = "body";
    article.append(who, body);
    if (role === "user") {
      body.textContent = text; // what the person typed, as typed
      return { article, body };
    }
    const markdown = new MarkdownView(body);
    markdown.update(text);
    return { article, body, markdown };
  }

  _actions(entry, parts) {
    const { message, parent } = entry;
    const controls = [];
    if (parent.children.length > 1) controls.push(this._versions(entry));
    if (message.role === "user") {
      controls.push(button("edit", "Edit", "Edit this message", () => this._edit(entry, parts)));
    } else {
      controls.push(button("regenerate", "Regenerate", "Regenerate this reply", () => this.actions.regenerate(entry)));
    }
    return controls;
  }

  _versions({ message, parent }) {
    const index = parent.children.indexOf(message);
    const count = parent.children.length;
    const what = message.role === "user" ? "message" : "reply";
    const group = document.createElement("span");
    group.className = "versions";
    group.setAttribute("role", "group");
    group.setAttribute("aria-label", `Versions of this ${what}`);
    const previous = button("previous", "‹", `Previous version of this ${what}`,
      () => this.actions.select(parent, index - 1));
    const next = button("next", "›", `Next version of this ${what}`, () => this.actions.select(parent, index + 1));
    previous.disabled = index === 0;
    next.disabled = index === count - 1;
    const position = document.createElement("span");
    position.className = "version";
    position.textContent = `${index + 1}/${count}`;
    position.setAttribute("aria-label", `version ${index + 1} of ${count}`);
    group.append(previous, position, next);
    return group;
  }

  // Turns a question into a form to change it; sending it asks the edited question instead.
  _edit(entry, { article, body }) {
    const footer = article.querySelector("footer");
    const form = document.createElement("form");
    form.className = "edit-form";
    const box = document.createElement("textarea");
    box.value = entry.message.text;
    box.rows = Math.min(8, box.value.split("\n").length + 1);
    box.setAttribute("aria-label", "Edit your message");
    const cancel = () => {
      form.replaceWith(body);
      footer.hidden = false;
      footer.querySelector(".edit").focus();
    };
    const send = () => {
      const text = box.value.trim();
      if (text) this.actions.edit(entry, text);
    };
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      send();
    });
    box.addEventListener("keydown", (event) => {
      if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
        event.preventDefault();
        send();
      } else if (event.key === "Escape") {
        event.stopPropagation();
        cancel();
      }
    });
    const actions = document.createElement("div");
    actions.className = "edit-actions";
    const submit = document.createElement("button");
    submit.type = "submit";
    submit.className = "primary";
    submit.textContent = "Send";
    actions.append(submit, button("cancel", "Cancel", "Cancel editing", cancel));
    form.append(box, actions);
    body.replaceWith(form);
    footer.hidden = true;
    box.focus();
    box.setSelectionRange(box.value.length, box.value.length);
  }
}
