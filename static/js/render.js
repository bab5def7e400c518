// Message text to DOM nodes. Model output is only ever set as text (textContent), never parsed
// as HTML; fenced code blocks become monospace blocks with a copy button.

const FENCE = /```([^\n`]*)\n?([\s\S]*?)(?:```|$)/g;

/** Plain text and fenced code blocks, in order; an unclosed fence runs to the end. */
export function splitFences(text) {
  const pieces = [];
  let last = 0;
  for (const match of text.matchAll(FENCE)) {
    if (match.index > last) pieces.push({ kind: "text", text: text.slice(last, match.index) });
    pieces.push({ kind: "code", language: match[1].trim(), text: match[2].replace(/\n$/, "") });
    last = match.index + match[0].length;
  }
  if (last < text.length) pieces.push({ kind: "text", text: text.slice(last) });
  return pieces;
}

async function copyText(text) {
  try {
    await navigator.clipboard.writeText(text);
  } catch {
    // No clipboard API (a page served over plain HTTP to another host): copy through a selection.
    const area = document.createElement("textarea");
    area.value = text;
    area.setAttribute("readonly", "");
    area.className = "offscreen";
    document.body.append(area);
    area.select();
    document.execCommand("copy");
    area.remove();
  }
}

function codeBlock(language, text) {
  const figure = document.createElement("figure");
  figure.className = "code";
  const caption = document.createElement("figcaption");
  const label = document.createElement("span");
  label.textContent = language || "code";
  const copy = document.createElement("button");
  copy.type = "button";
  copy.className = "copy";
  copy.textContent = "Copy";
  copy.setAttribute("aria-label", `Copy ${language || "code"} block`);
  copy.addEventListener("click", async () => {
    await copyText(text);
    copy.textContent = "Copied";
    setTimeout(() => (copy.textContent = "Copy"), 1500);
  });
  caption.append(label, copy);
  const pre = document.createElement("pre");
  const code = document.createElement("code");
  code.textContent = text;
  pre.append(code);
  figure.append(caption, pre);
  return figure;
}

/** Replaces `element`'s content with `text` as paragraphs-with-newlines and code blocks. */
export function renderText(element, text) {
  const nodes = splitFences(text).map((piece) => {
    if (piece.kind === "code") return codeBlock(piece.language, piece.text);
    const paragraph = document.createElement("div");
    paragraph.className = "text";
    paragraph.textContent = piece.text.replace(/^\n+|\n+$/g, "");
    return paragraph;
  });
  element.replaceChildren(...nodes.filter((node) => node.className !== "text" || node.textContent));
}
