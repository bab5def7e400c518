// Model output as Markdown, safely. markdown-it parses it with raw HTML turned off, so any HTML a
// model writes stays text; DOMPurify then checks the HTML markdown-it wrote, as a second guard.
// Links go only to http(s) and mailto addresses and open in a new tab without access to this page;
// images become links (nothing is loaded from another site); code blocks are highlighted and get a
// Copy button.

import markdownit from "../vendor/markdown-it.min.js";
import hljs from "../vendor/highlight.min.js";
import "../vendor/purify.min.js"; // a UMD build: importing it defines globalThis.DOMPurify

const SAFE_URL = /^(?:https?:|mailto:)/i;

// Everything markdown-it writes for the rules used here, and nothing else.
const SANITIZER_CONFIG = {
  ALLOWED_TAGS: [
    "a", "blockquote", "br", "button", "code", "em", "figcaption", "figure", "h1", "h2", "h3", "h4", "h5",
    "h6", "hr", "li", "ol", "p", "pre", "s", "span", "strong", "table", "tbody", "td", "th", "thead", "tr",
    "ul",
  ],
  ALLOWED_ATTR: ["aria-label", "class", "href", "start", "title"],
  ALLOWED_URI_REGEXP: SAFE_URL,
  RETURN_DOM_FRAGMENT: true,
};

const markdown = markdownit({ html: false, linkify: true, breaks: true });
markdown.validateLink = (url) => SAFE_URL.test(url);
markdown.renderer.rules.fence = (tokens, index) => {
  const token = tokens[index];
  return codeFigure(token.content, token.info.trim().split(/\s+/)[0], token.meta.highlight);
};
markdown.renderer.rules.code_block = (tokens, index) => codeFigure(tokens[index].content, "", true);
markdown.renderer.rules.image = (tokens, index) => {
  const token = tokens[index];
  const alt = markdown.utils.escapeHtml(token.content || "image");
  return `<a href="${markdown.utils.escapeHtml(token.attrGet("src"))}">${alt}</a>`;
};

function codeFigure(content, language, highlight) {
  const label = markdown.utils.escapeHtml(language || "code");
  const code = content.replace(/\n$/, "");
  const html = highlight && language && hljs.getLanguage(language)
    ? hljs.highlight(code, { language, ignoreIllegals: true }).value
    : markdown.utils.escapeHtml(code);
  return `<figure class="code"><figcaption><span>${label}</span>` +
    `<button class="copy" aria-label="Copy ${label} block">Copy</button></figcaption>` +
    `<pre><code class="hljs">${html}</code></pre></figure>`;
}

// Whether the fenced code block `token`, whose source is `lines`, has its closing fence.
function fenceClosed(token, lines) {
  const last = lines.at(-1).trim();
  return lines.length > 1 && last.length >= token.markup.length && [...last].every((char) => char === token.markup[0]);
}

/**
 * The top-level blocks of `text`: each one's tokens and a key that changes when its output may.
 * While the text is `growing`, a code block still open is not highlighted: it would be highlighted
 * (and its many nodes checked) again for every token; it is once its closing fence has come.
 */
function parseBlocks(text, growing) {
  const env = {};
  const tokens = markdown.parse(text, env);
  const lines = text.split("\n");
  // A reference definition ([label]: url) changes links anywhere in the text.
  const references = env.references ? JSON.stringify(env.references) : "";
  const blocks = [];
  for (const token of tokens) {
    if (token.type === "fence") {
      token.meta = { highlight: !growing || fenceClosed(token, lines.slice(token.map[0], token.map[1])) };
    }
    if (token.level === 0 && token.nesting !== -1) {
      const source = lines.slice(token.map[0], token.map[1]).join("\n");
      blocks.push({ tokens: [], env, key: `${growing}\n${token.type}\n${references}\n${source}` });
    }
    blocks.at(-1).tokens.push(token);
  }
  return blocks;
}

function finishLinks(fragment) {
  for (const link of fragment.querySelectorAll("a")) {
    if (SAFE_URL.test(link.getAttribute("href") || "")) {
      link.target = "_blank";
      link.rel = "noopener noreferrer";
    } else {
      link.replaceWith(...link.childNodes);
    }
  }
}

function renderBlock(block) {
  const html = markdown.renderer.render(block.tokens, markdown.options, block.env);
  const fragment = globalThis.DOMPurify.sanitize(html, SANITIZER_CONFIG);
  finishLinks(fragment);
  const element = document.createElement("div");
  element.className = "md-block";
  element.append(fragment);
  return element;
}

/**
 * Markdown shown in an element and updated as its text grows. Each top-level block (paragraph,
 * list, code block...) is an element of its own, and an update renders again only the blocks
 * from the first one whose source changed: while a reply streams, that is its last block, so
 * the finished ones keep their nodes (no flicker, no reflow of the whole reply per token).
 */
export class MarkdownView {
  /** Shows Markdown in `element` (its content is replaced). */
  constructor(element) {
    this.element = element;
    this.element.classList.add("markdown");
    this.element.replaceChildren();
    this.shown = []; // [{key, element}] of the blocks on show, in order
  }

  /**
   * Shows `text`, keeping the elements of the leading blocks that did not change; `growing`:
   * whether more text may follow (a reply being written).
   */
  update(text, growing = false) {
    const blocks = parseBlocks(text, growing);
    let kept = 0;
    while (kept < this.shown.length && kept < blocks.length && this.shown[kept].key === blocks[kept].key) kept += 1;
    for (const block of this.shown.splice(kept)) block.element.remove();
    for (const block of blocks.slice(kept)) {
      const element = renderBlock(block);
      this.element.append(element);
      this.shown.push({ key: block.key, element });
    }
  }
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

/** Makes the Copy buttons of the code blocks shown in `container` copy their code. */
export function enableCodeCopy(container) {
  // One listener for every block: blocks are rendered again as replies stream.
  container.addEventListener("click", async (event) => {
    const button = event.target.closest(".code .copy");
    if (!button) return;
    await copyText(button.closest(".code").querySelector("code").textContent);
    button.textContent = "Copied";
    setTimeout(() => (button.textContent = "Copy"), 1500);
  });
}
