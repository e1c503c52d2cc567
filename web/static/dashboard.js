// autotune dashboard: draw the page's Plotly figures, page/sort/filter the trials table through the
// server (a study may hold 10,000 trials: the page carries one page of them), and follow a running
// study by polling a small JSON endpoint (no manual reload). No external resources, no inline code.
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

// The trials table: its links (sort, previous/next) and its filter form ask the server for that
// view of the table (?part=table) and swap it in; the address bar keeps the view (reload, share).
let tableRequest = 0;

async function loadTable(href, focusFilter) {
  const want = new URL(href, window.location.href);
  const url = new URL(want);
  url.searchParams.set("part", "table");
  const mine = ++tableRequest;
  try {
    const res = await fetch(url, {cache: "no-store"});
    if (!res.ok || mine !== tableRequest) return;
    const doc = new DOMParser().parseFromString(await res.text(), "text/html");
    const fresh = doc.getElementById("trials-part");
    const cur = document.getElementById("trials-part");
    if (!fresh || !cur || mine !== tableRequest) return;
    const filter = document.getElementById("trial-filter");
    const caret = filter && document.activeElement === filter ? filter.selectionStart : null;
    cur.replaceWith(fresh);
    setupTable(document);
    window.history.replaceState(null, "", want.pathname + want.search);
    const next = document.getElementById("trial-filter");
    if (next && (focusFilter || caret !== null)) {
      next.focus();
      if (caret !== null) next.setSelectionRange(caret, caret);
    }
  } catch (e) {
    // the server restarted or the network blinked: the links still work as plain links
  }
}

function formHref(form) {
  const params = new URLSearchParams();
  for (const [k, v] of new FormData(form)) if (v !== "") params.set(k, v);
  const query = params.toString();
  return form.getAttribute("action") + (query ? "?" + query : "");
}

function setupTable(root) {
  const part = root.querySelector("#trials-part");
  if (!part) return;
  part.addEventListener("click", (ev) => {
    const a = ev.target.closest("a.sort, #pager a");
    if (!a || ev.ctrlKey || ev.metaKey || ev.shiftKey) return;
    ev.preventDefault();
    loadTable(a.href, false);
  });
  const form = part.querySelector("#trial-form");
  if (!form) return;
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    loadTable(formHref(form), true);
  });
  let timer = null;
  const text = form.querySelector("#trial-filter");
  if (text) {
    text.addEventListener("input", () => {
      clearTimeout(timer);
      timer = setTimeout(() => loadTable(formHref(form), true), 250);
    });
  }
  const state = form.querySelector("#state-filter");
  if (state) state.addEventListener("change", () => loadTable(formHref(form), false));
}

// The studies list compares a signature of every study; a study page its trial count, status and
// last update.
function changed(st, el) {
  if (Array.isArray(st)) return st.map((s) => s.name + ":" + s.trials_done + ":" + s.status).join("|") !== el.dataset.sig;
  return String(st.trials_done) !== el.dataset.trials || st.status !== el.dataset.status ||
    (el.dataset.updated !== undefined && (st.updated_at || "") !== el.dataset.updated);
}

function followStudy() {
  const live = document.getElementById("live");
  if (!live || !live.dataset.statusUrl) return;
  const poll = async () => {
    try {
      const res = await fetch(live.dataset.statusUrl, {cache: "no-store"});
      const cur = document.getElementById("live");
      const typing = document.activeElement && document.activeElement.id === "trial-filter";
      if (res.ok && !typing) {
        const st = await res.json();
        if (changed(st, cur)) {
          const page = await fetch(window.location.href, {cache: "no-store"});  // the same table view
          if (page.ok) {
            const doc = new DOMParser().parseFromString(await page.text(), "text/html");
            const fresh = doc.getElementById("live");
            if (fresh) {
              cur.replaceWith(fresh);
              drawFigures(fresh);
              setupTable(fresh);
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
