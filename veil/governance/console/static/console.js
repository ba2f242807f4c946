// The console works without JavaScript; this only adds confirmations and refreshes the pending list.
document.addEventListener("DOMContentLoaded", () => {
  for (const form of document.querySelectorAll("form[data-confirm]")) {
    form.addEventListener("submit", (e) => { if (!window.confirm(form.dataset.confirm)) e.preventDefault(); });
  }
  const table = document.querySelector("table[data-autorefresh]");
  if (table) {
    setTimeout(() => window.location.reload(), 1000 * Number(table.dataset.autorefresh));
  }
});
