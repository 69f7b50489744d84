// Keyboard shortcuts: a key presses the button whose data-keys lists it (htmx does the rest).
document.addEventListener("keydown", (event) => {
  if (event.ctrlKey || event.metaKey || event.altKey || event.repeat) return;
  if (event.target.closest("input, textarea, select, [contenteditable]")) return;
  const key = event.key.length === 1 ? event.key.toLowerCase() : event.key;
  const button = [...document.querySelectorAll("[data-keys]")]
    .find((b) => b.dataset.keys.split(" ").includes(key));
  if (!button || button.disabled) return;
  event.preventDefault();  // Backspace must not navigate back, arrows must not scroll
  button.classList.add("pressed");
  button.click();
});
