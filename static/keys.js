// Keyboard shortcuts: a key presses the button whose data-keys lists it (htmx does the rest).
document.addEventListener("keydown", (event) => {
  if (event.ctrlKey || event.metaKey || event.altKey || event.repeat) return;
  if (event.target.closest("input, textarea, select, [contenteditable]")) return;
  const key = event.key.length === 1 ? event.key.toLowerCase() : event.key;
  const button = [...document.querySelectorAll("[data-keys]")]
    .find((b) => b.dataset.keys.split(" ").includes(key));
  if (!button || button.disabled) return;
  event.preventDefault();  // Backspace must not navigate back, arrows must not scroll
  // htmx wires a freshly swapped card only when it settles (20 ms later); a key pressed
  // sooner would post the form natively and leave the page, so wire it now (idempotent).
  if (window.htmx) htmx.process(button.form ?? button);
  button.classList.add("pressed");
  button.click();
});

// A drop zone hides its file input, so its label says which files are chosen.
function showChosen(input) {
  const label = input.closest(".dropzone")?.querySelector("span");
  if (!label) return;
  label.dataset.empty ??= label.textContent;
  const names = [...input.files].map((file) => file.name);
  label.textContent = names.length ? `${names.length} chosen: ${names.join(", ")}` : label.dataset.empty;
}
document.addEventListener("change", (event) => {
  if (event.target.matches(".dropzone input[type=file]")) showChosen(event.target);
});
document.addEventListener("reset", (event) => {  // fires before the reset, so look right after
  setTimeout(() => event.target.querySelectorAll(".dropzone input[type=file]").forEach(showChosen));
});

// An upload form empties itself once its files are in (no inline handler: the CSP forbids them).
document.addEventListener("htmx:afterRequest", (event) => {
  const form = event.detail.elt.closest?.("form[data-reset-after-upload]");
  if (form && event.detail.successful) form.reset();
});

// A form with data-confirm asks first (instead of an inline onsubmit, which the CSP forbids).
document.addEventListener("submit", (event) => {
  const question = event.target.dataset?.confirm;
  if (question && !window.confirm(question)) event.preventDefault();
});
// My taste: while a training job runs, its button says so and can't be pressed; when the job
// ends it is "Train my taste" again (if the person has enough ratings: data-ready).
document.addEventListener("htmx:afterSettle", () => {
  const button = document.getElementById("train-button");
  const job = document.querySelector("#taste-job .taste-job");
  if (!button || !job) return;
  const running = !["succeeded", "failed", "cancelled"].includes(job.dataset.status);
  button.disabled = running || button.dataset.ready !== "true";
  button.textContent = running ? "Training…" : "Train my taste";
  const reason = document.getElementById("train-reason");
  if (reason && reason.dataset.idle) {  // the words beside the button follow it
    reason.textContent = running ? "Your taste is training now — its progress is below." : reason.dataset.idle;
  }
});

// A form's answer that lands out of sight (a notice at the top of a long page, a new job widget
// above the form) is scrolled into view, so a refusal or a started import is never missed.
document.addEventListener("htmx:afterSettle", (event) => {
  const { target, requestConfig } = event.detail;
  if (!target || requestConfig?.verb !== "post") return;
  const form = requestConfig.elt?.closest?.("form") ?? requestConfig.elt;
  const added = form?.getAttribute?.("hx-swap") === "afterbegin" ? target.firstElementChild : null;
  const shown = target.id === "notice" ? target : added;
  if (!shown || !shown.textContent.trim()) return;
  const header = document.querySelector("header.topbar")?.getBoundingClientRect().bottom ?? 0;
  const box = shown.getBoundingClientRect();
  if (box.top < header || box.bottom > window.innerHeight) {
    shown.scrollIntoView({ block: "center" });
  }
});
