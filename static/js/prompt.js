// How a conversation becomes model input: the model's chat settings (from /api/v1/models) give
// the turn separator and stop token; the role markers depend on the model's chat format.

export const SYSTEM_TEXT =
  "A conversation between a curious person and a helpful AI assistant. " +
  "The assistant answers clearly, accurately and politely.";
export const GREETING = "Hi! How can I help you today?";

// ChatML models end each turn with <|im_end|>; every other model gets plain "Role: text" turns,
// the same fallback the server's OpenAI-compatible API uses.
const CHATML_END = "<|im_end|>";

/** The chat format of a model: role markers, separator, stop sequences. */
export function chatFormat(chat) {
  const stop = chat.stop_token;
  const chatml = stop === CHATML_END;
  return {
    sep: chat.sep_token,
    stop,
    stopSequences: [stop, ...(chat.extra_stop_sequences || [])].filter(Boolean),
    system: chatml ? `<|im_start|>system\n${SYSTEM_TEXT}` : SYSTEM_TEXT,
    turn: chatml
      ? (role, text) => `<|im_start|>${role}\n${text}`
      : (role, text) => `${role === "user" ? "User" : "Assistant"}: ${text}`,
    replyPrefix: chatml ? "<|im_start|>assistant\n" : "Assistant:",
  };
}

/**
 * The text to send so that the session holds `turns` and then the start of a new reply.
 *
 * `sentTurns` turns are already in the session: only the rest is sent. When the last reply in
 * the session ended with the model's stop token, the separator's copy of it is left out.
 */
export function newInputs(format, turns, sentTurns, endsWithStop) {
  const parts = sentTurns === 0 ? [format.system, format.turn("assistant", GREETING)] : [];
  for (const turn of turns.slice(sentTurns)) parts.push(format.turn(turn.role, turn.text));
  parts.push(format.replyPrefix);
  const text = parts.join(format.sep);
  if (sentTurns === 0) return text;
  const stopInSep = endsWithStop && format.sep.startsWith(format.stop);
  return (stopInSep ? format.sep.slice(format.stop.length) : format.sep) + text;
}

/**
 * A reply as it is shown: cut at the first stop sequence, and while it is still streaming,
 * without a trailing piece that may be the start of one.
 */
export function visibleReply(format, text, finished) {
  let end = text.length;
  let stopped = false;
  for (const sequence of format.stopSequences) {
    const at = text.indexOf(sequence);
    if (at !== -1 && at < end) {
      end = at;
      stopped = true;
    }
  }
  let shown = text.slice(0, end);
  if (!finished && !stopped) {
    for (const sequence of format.stopSequences) {
      for (let size = Math.min(sequence.length - 1, shown.length); size > 0; size--) {
        if (shown.endsWith(sequence.slice(0, size))) {
          shown = shown.slice(0, -size);
          break;
        }
      }
    }
  }
  return { text: shown.replace(/^\s+/, ""), endsWithStop: stopped };
}
