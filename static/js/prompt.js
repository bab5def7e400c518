// How a conversation becomes model input. The server owns each model's chat format and serves it
// as `chat.format` in /api/v1/models (each role's prefix and suffix, the generation prefix, the
// stop token and stop sequences); the page writes nothing that is not in it.

// The system text of a conversation whose own is not set.
export const SYSTEM_TEXT =
  "A conversation between a curious person and a helpful AI assistant. " +
  "The assistant answers clearly, accurately and politely.";
export const GREETING = "Hi! How can I help you today?";

function message(format, role, text) {
  const { prefix, suffix } = format.roles[role];
  return prefix + text + suffix;
}

/**
 * The text to send so that the session holds `systemText`, the greeting, `turns` ([{role, text}])
 * and then the start of a new reply.
 *
 * `sentTurns` turns are already in the session, the last of them a reply without its suffix:
 * only the rest is sent, that suffix first. When the reply ended with the model's stop token
 * (`endsWithStop`) and the suffix starts with it, only the rest of the suffix is sent.
 */
export function newInputs(format, systemText, turns, sentTurns, endsWithStop) {
  let text;
  if (sentTurns === 0) {
    text = message(format, "system", systemText) + message(format, "assistant", GREETING);
  } else {
    const { suffix } = format.roles.assistant;
    const stopInSuffix = endsWithStop && suffix.startsWith(format.stop_token);
    text = stopInSuffix ? suffix.slice(format.stop_token.length) : suffix;
  }
  for (const turn of turns.slice(sentTurns)) text += message(format, turn.role, turn.text);
  return text + format.generation_prefix;
}

/**
 * Whether the session ends with the model's stop token after a reply whose raw text is `outputs`.
 * A reply ends at its first stop sequence; the server puts the stop token in place of any other
 * stop sequence, so that the next turn follows it as it would follow the stop token.
 */
export function endsWithStop(format, outputs) {
  return format.stop_sequences.some((sequence) => outputs.includes(sequence));
}

/** The stop sequences other than the stop token, for a `generate` request. */
export function extraStopSequences(format) {
  return format.stop_sequences.filter((sequence) => sequence !== format.stop_token);
}
