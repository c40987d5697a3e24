// Keeps a page's live part fresh: when the exchange's event stream (the
// body's data-live) says something happened, and every few seconds besides
// (orders that do not trade send no event), the #live element is fetched
// again from its data-src. No reloads, no libraries.
(function () {
  const live = document.getElementById("live");
  const stream = document.body.dataset.live;
  if (!live || !live.dataset.src) return;
  let pending = false;
  async function refresh() {
    if (pending) return;
    pending = true;
    try {
      const r = await fetch(live.dataset.src, { credentials: "same-origin" });
      if (r.ok) live.innerHTML = await r.text();
    } finally {
      pending = false;
    }
  }
  if (stream && window.EventSource) {
    const es = new EventSource(stream);
    for (const kind of ["trade", "lease"]) es.addEventListener(kind, refresh);
  }
  setInterval(refresh, 5000);
})();
