// Live updates: the server says `change` (server-sent events) when an incident of this user's
// scope changed, and the page fetches its own live part again, rendered (and escaped) by the
// server. One fetch at a time; a change during a fetch makes one more.
(function () {
  "use strict";
  const live = document.getElementById("live");
  if (!live || !live.dataset.live) return;
  let busy = false, again = false, typing = false;
  async function refresh() {
    if (busy) { again = true; return; }
    busy = true;
    try {
      const r = await fetch(location.pathname + location.search,
                            {headers: {"X-Fragment": "1"}, credentials: "same-origin"});
      if (r.redirected || r.status === 401) { location.reload(); return; }
      if (r.ok) {
        const active = document.activeElement;
        typing = Boolean(active && active.form && live.contains(active) && active.value);
        if (typing) {
          again = true;        // someone is typing a note: wait until they are done
        } else {
          live.innerHTML = await r.text();
          live.dataset.refreshed = String(Date.now());
        }
      }
    } finally {
      busy = false;
      if (again) { again = false; setTimeout(refresh, typing ? 500 : 0); }
    }
  }
  const events = new EventSource("/events");
  events.addEventListener("change", refresh);
  events.addEventListener("open", () => { live.dataset.connected = "1"; refresh(); });
  // the big screen's "waited" times move on when nothing changes too
  if (live.dataset.tick) setInterval(refresh, Number(live.dataset.tick) * 1000);
})();
