// The colour theme: the system's (light or dark as the device says), light or dark, remembered in
// local storage. chat.css picks its colours from the root element's `color-scheme`, which the
// root's data-theme attribute sets (no attribute: the system's).

const KEY = "swarm-chat-theme";
const THEMES = ["system", "light", "dark"];

function savedTheme() {
  try {
    const theme = localStorage.getItem(KEY);
    return THEMES.includes(theme) ? theme : "system";
  } catch {
    return "system";
  }
}

function applyTheme(theme) {
  if (theme === "system") delete document.documentElement.dataset.theme;
  else document.documentElement.dataset.theme = theme;
}

/** Applies the remembered theme, shows it in `select` and applies and remembers the ones chosen there. */
export function setUpThemePicker(select) {
  const theme = savedTheme();
  applyTheme(theme);
  select.value = theme;
  select.addEventListener("change", () => {
    applyTheme(select.value);
    try {
      localStorage.setItem(KEY, select.value);
    } catch {
      // Not kept: the theme is back to the system's on the next visit.
    }
  });
}
