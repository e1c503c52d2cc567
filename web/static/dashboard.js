// autotune dashboard: draw the page's Plotly figures, sort/filter the trials table, and follow a
// running study by polling a small JSON endpoint (no manual reload). No external resources.
"use strict";

function drawFigures(root) {
  const block = root.querySelector("#figs");
  if (!block || typeof Plotly === "undefined") return;
  const figs = JSON.parse(block.textContent);
  for (const [key, fig] of Object.entries(figs)) {
    const el = root.querySelector("#fig-" + key);
    if (!el || !fig) continue;
    Plotly.react(el, fig.data, fig.layout, {responsive: true, displaylogo: false});
    if (key === "pareto" || key === "history") {
      el.on("plotly_click", (ev) => {
        const n = ev.points && ev.points[0] && ev.points[0].customdata;
        if (n !== undefined && n !== null) window.location.href = window.location.pathname.replace(/\/$/, "") + "/trials/" + n;
      });
    }
  }
}

function cellValue(row, i, numeric) {
  const cell = row.cells[i];
  const raw = cell.dataset.v !== undefined ? cell.dataset.v : cell.textContent.trim();
  if (!numeric) return raw.toLowerCase();
  return raw === "" ? NaN : parseFloat(raw);
}

function setupTable(root) {
  const table = root.querySelector("table.sortable");
  if (!table) return;
  const body = table.tBodies[0];
  table.querySelectorAll("th").forEach((th, i) => {
    th.addEventListener("click", () => {
      const numeric = th.dataset.type === "num";
      const dir = th.dataset.dir === "asc" ? "desc" : "asc";
      table.querySelectorAll("th").forEach((h) => delete h.dataset.dir);
      th.dataset.dir = dir;
      const rows = Array.from(body.rows);
      rows.sort((a, b) => {
        const x = cellValue(a, i, numeric), y = cellValue(b, i, numeric);
        if (numeric) {
          if (isNaN(x)) return 1;
          if (isNaN(y)) return -1;
          return dir === "asc" ? x - y : y - x;
        }
        return dir === "asc" ? x.localeCompare(y) : y.localeCompare(x);
      });
      rows.forEach((r) => body.appendChild(r));
    });
  });
  const text = root.querySelector("#trial-filter");
  const state = root.querySelector("#state-filter");
  const apply = () => {
    const q = (text && text.value || "").toLowerCase();
    const s = state && state.value || "";
    for (const r of body.rows) {
      const show = (!s || r.dataset.state === s) && (!q || r.textContent.toLowerCase().includes(q));
      r.style.display = show ? "" : "none";
    }
  };
  if (text) text.addEventListener("input", apply);
  if (state) state.addEventListener("change", apply);
  return apply;
}

// The studies list compares a signature of every study; a study page its trial count and status.
function changed(st, el) {
  if (Array.isArray(st)) return st.map((s) => s.name + ":" + s.trials_done + ":" + s.status).join("|") !== el.dataset.sig;
  return String(st.trials_done) !== el.dataset.trials || st.status !== el.dataset.status;
}

function followStudy() {
  const live = document.getElementById("live");
  if (!live || !live.dataset.statusUrl) return;
  const poll = async () => {
    try {
      const res = await fetch(live.dataset.statusUrl, {cache: "no-store"});
      if (res.ok) {
        const st = await res.json();
        const cur = document.getElementById("live");
        if (changed(st, cur)) {
          const page = await fetch(window.location.href, {cache: "no-store"});
          if (page.ok) {
            const doc = new DOMParser().parseFromString(await page.text(), "text/html");
            const fresh = doc.getElementById("live");
            if (fresh) {
              const q = document.getElementById("trial-filter"), s = document.getElementById("state-filter");
              const keep = [q ? q.value : "", s ? s.value : ""];
              cur.replaceWith(fresh);
              drawFigures(fresh);
              const nq = document.getElementById("trial-filter"), ns = document.getElementById("state-filter");
              if (nq) nq.value = keep[0];
              if (ns) ns.value = keep[1];
              const apply = setupTable(fresh);
              if (apply) apply();
            }
          }
        }
      }
    } catch (e) {
      // the server restarted or the network blinked: try again next tick
    }
    setTimeout(poll, 3000);
  };
  setTimeout(poll, 3000);
}

drawFigures(document);
setupTable(document);
followStudy();
